"""Full training checkpoints: everything needed to continue a run bit for bit, and the one place
that knows their layout (the run loop writes them; export and evaluation read them through here).

A checkpoint holds the resolved config, the run's position (step, steps per epoch, the best
evaluation so far, torch's RNG) and the training step's own state (for a GAN: G, D, the EMA
generator, both optimizers and the noise stream). It is written atomically, so a crash while
saving leaves the previous checkpoint intact. Format 1 (everything at the top level, ``best_fd``
before toy runs had an objective) is read and upgraded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcgan_core import __version__
from dcgan_core.atomic import atomic_write_bytes
from training.config import TrainConfig, differences, from_dict

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the best in-training evaluation (run.eval_every): lowest FD, toys most modes
FORMAT_VERSION = 2
_V1_MODEL_KEYS = ("generator", "discriminator", "ema", "opt_g", "opt_d", "noise_rng", "g_steps", "last_loss_g")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or made under a different config."""


@dataclass
class Checkpoint:
    """One saved moment of a run."""

    config: dict[str, Any]  # TrainConfig.to_dict() of the resolved config
    step: int
    steps_per_epoch: int
    best_objective: float = math.inf  # lowest objective of the in-training evaluations so far
    torch_rng: torch.Tensor | None = None
    model: dict[str, Any] = field(default_factory=dict)  # the training step's state_dict()
    package_version: str = __version__  # of the code that wrote it

    @property
    def train_config(self) -> TrainConfig:
        return from_dict(self.config)

    def network(self, name: str) -> dict[str, Any] | None:
        """The weights of one network (``generator``, ``discriminator``, ``ema``: None when the run
        kept no EMA)."""
        if name not in self.model:
            raise CheckpointError(f"the checkpoint holds no {name!r} network (it has {', '.join(self.model)})")
        return self.model[name]


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` with its format atomically to ``path``."""
    payload = {"format": FORMAT_VERSION, **checkpoint.__dict__}
    buffer = io.BytesIO()  # serialized first: a full disk then surfaces as OSError from the write
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save` (or format 1); any problem is a CheckpointError."""
    try:  # weights_only: tensors and plain containers only, so a foreign file cannot run code
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{path} is not a dcgan checkpoint of format 1 or {FORMAT_VERSION}")
    try:
        return _from_v1(state) if state["format"] == 1 else Checkpoint(
            state["config"], state["step"], state["steps_per_epoch"], state["best_objective"],
            state["torch_rng"], state["model"], state["package_version"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: format {state['format']} checkpoint without {exc}") from None


def _from_v1(state: dict[str, Any]) -> Checkpoint:
    best = state.get("best_objective", state.get("best_fd", math.inf))  # best_fd: before toy objectives
    return Checkpoint(state["config"], state["step"], state["steps_per_epoch"], best, state["torch_rng"],
                      {key: state[key] for key in _V1_MODEL_KEYS}, state.get("package_version", ""))


def check_compatible(checkpoint: Checkpoint, config: TrainConfig, path: Path, force: bool) -> None:
    """Refuse to resume under a config that differs in anything but RESUMABLE_KEYS."""
    changed = differences(checkpoint.train_config, config)
    if changed and not force:
        raise CheckpointError(
            f"{path} was made with a different config; refusing to resume "
            f"(use --force to resume anyway, or another run directory):\n  " + "\n  ".join(changed))
