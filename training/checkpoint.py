"""Full training checkpoints: everything needed to continue a run bit for bit.

A checkpoint holds G, D, the EMA generator, both optimizers, the step, every RNG state, the
resolved config and the package version. It is written atomically, so a crash while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from dcgan_core import __version__
from dcgan_core.atomic import atomic_write_bytes
from training.config import TrainConfig, differences, from_dict

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the best in-training evaluation (run.eval_every): lowest FD, toys most modes
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or made under a different config."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` plus format metadata atomically to ``path``."""
    payload = {"format": FORMAT_VERSION, "package_version": __version__, **state}
    buffer = io.BytesIO()  # serialized first: a full disk then surfaces as OSError from the write
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; any problem is a CheckpointError naming it."""
    try:  # weights_only: tensors and plain containers only, so a foreign file cannot run code
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a dcgan checkpoint of format {FORMAT_VERSION}")
    return state


def check_compatible(state: dict[str, Any], config: TrainConfig, path: Path, force: bool) -> None:
    """Refuse to resume under a config that differs in anything but RESUMABLE_KEYS."""
    changed = differences(from_dict(state["config"]), config)
    if changed and not force:
        raise CheckpointError(
            f"{path} was made with a different config; refusing to resume "
            f"(use --force to resume anyway, or another run directory):\n  " + "\n  ".join(changed))
