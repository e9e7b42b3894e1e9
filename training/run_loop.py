"""The run loop: the job around any training step (the GAN's, an encoder's).

It owns what a run is rather than what it learns: the device and the torchrun world, the run
directory and its lock, the batches in their seeded order, signals, progress, the metrics log,
sample grids and curves at each epoch's end, in-training evaluations and best.pt, checkpoints and
exact resume. Rank 0 alone writes. A step plugs in through :class:`Step`: it trains on one batch
and hands over the state a checkpoint keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from dcgan_core import locking
from training import checkpoint, distributed, reporting
from training.config import ConfigError, TrainConfig
from training.data import ImageBatches, ToyBatches, build_batches

log = logging.getLogger(__name__)
RUN_LOCK = ".lock"
EVAL_LOG = "eval.jsonl"


@dataclass(frozen=True)
class RunContext:
    """What the loop gives a step: where it runs, and what the data says."""

    device: torch.device
    world: distributed.World
    class_frequencies: torch.Tensor | None  # conditional data: the share of each class


class Step(Protocol):
    """One optimisation step of a model, with its own state for checkpoints."""

    memory_format: torch.memory_format  # the layout the batches are given in

    def train(self) -> None: ...  # networks into training mode
    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, step: int,
                   progress: float) -> dict[str, float]: ...
    def diverged(self, stats: dict[str, float]) -> str | None: ...  # the metric that is not finite
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def evaluate(self) -> dict[str, float]: ...  # in-training evaluation, with its "objective"
    def save_samples(self, path: Path, step: int) -> None: ...


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float, progress: float, decay: str) -> None:
    """``base_lr`` scheduled by the run's ``progress`` (0..1): constant, or ``linear`` down to 0 at
    the last step. A function of progress alone, so a resumed run follows it exactly."""
    scale = 1.0 - progress if decay == "linear" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = base_lr * scale


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.*.tmp``) that a kill -9 left behind. Only called
    while holding the run's lock, so no live writer owns them."""
    stale = [p for p in run_dir.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", path)
    return stale


class _StopRequests:
    """SIGINT/SIGTERM handlers for the training loop (main thread only; elsewhere a no-op): the
    first signal asks the loop to stop at the next step boundary, a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: stopping after this step (send it again to stop at once, unsaved)", signum)

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the run directory still holds the last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    epoch: float
    last_metrics: dict[str, float]
    run_dir: Path


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but CUDA is not available on this machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def with_class_names(config: TrainConfig, names: list[str]) -> TrainConfig:
    """``config`` resolved with the data's class names (a copy: the caller's config stays as it
    was), which the checkpoint and the manifest then record."""
    configured = config.model.class_names
    if configured and list(configured) != list(names):
        raise ConfigError(f"model.class_names = {configured} but the data's classes are {names}")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, class_names=list(names)))


class RunLoop:
    """Drives one step object over a run directory: ``RunLoop(config, GANStep).train()``."""

    def __init__(self, config: TrainConfig, make_step: Callable[[TrainConfig, RunContext], Step],
                 force: bool = False, batches: ImageBatches | ToyBatches | None = None):
        self.run_dir = Path(config.run.run_dir)
        self.device = resolve_device(config.run.device)
        self.world = distributed.join(self.device.type)
        if self.device.type == "cuda" and self.world.size > 1:
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        _check_world(config, self.world, self.device)
        self.batches = batches or build_batches(config)
        classes = config.model.num_classes
        self.config = with_class_names(config, self.batches.class_names) if classes else config
        frequencies = self.batches.class_frequencies() if classes else None
        self.model = make_step(self.config, RunContext(self.device, self.world, frequencies))
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.step = 0
        self.best_objective = math.inf  # lowest objective of the in-training evaluations so far
        self.checkpoint_path = self.run_dir / checkpoint.CHECKPOINT_NAME
        self.metrics: reporting.MetricsLog | None = None  # open only inside train()
        with self._owning_run_dir():
            pass  # in use by another run: say so before anything else (train() holds it)
        if self.checkpoint_path.exists():
            self._resume(force)

    def _owning_run_dir(self) -> contextlib.AbstractContextManager:
        """The run directory's lock, held by rank 0 alone (the one process that writes there)."""
        if not self.world.main:
            return contextlib.nullcontext()
        return locking.exclusive(self.run_dir / RUN_LOCK, f"run directory {self.run_dir}")

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> checkpoint.Checkpoint:
        return checkpoint.Checkpoint(self.config.to_dict(), self.step, self.steps_per_epoch, self.best_objective,
                                     torch.get_rng_state(), self.model.state_dict())

    def save_checkpoint(self) -> None:
        if not self.world.main:
            return
        if self.metrics is not None:
            self.metrics.flush()
        checkpoint.save(self.checkpoint_path, self.snapshot())

    def _resume(self, force: bool) -> None:
        saved = checkpoint.load(self.checkpoint_path, self.device)
        checkpoint.check_compatible(saved, self.config, self.checkpoint_path, force)
        if saved.steps_per_epoch != self.steps_per_epoch and not force:
            raise checkpoint.CheckpointError(
                f"{self.checkpoint_path}: the data gives {self.steps_per_epoch} steps per epoch, "
                f"the checkpoint {saved.steps_per_epoch}; refusing to resume on other data")
        self.model.load_state_dict(saved.model)
        torch.set_rng_state(saved.torch_rng.cpu())
        self.step, self.best_objective = saved.step, saved.best_objective
        log.info("resumed %s at step %d", self.checkpoint_path, self.step)

    # ------------------------------------------------------------------ the loop

    @property
    def planned_steps(self) -> int:
        """Steps in the configured epochs: the length the schedules are drawn over."""
        return self.config.run.epochs * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Steps this run will take: the planned ones, or fewer if ``run.max_steps`` says so."""
        planned, limit = self.planned_steps, self.config.run.max_steps
        return min(planned, limit) if limit else planned

    def progress(self) -> float:
        """Share of the run done, 0 to 1: a pure function of the step (no scheduler state), so a
        resumed run follows exactly the schedules of an uninterrupted one. The length is the
        configured epochs (``run.max_steps`` only stops a run early)."""
        return min(1.0, self.step / self.planned_steps)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's real images and their condition (labels, for a conditional model; source
        images, for a translation model) of a global step: the order is a function of the step,
        which is what makes resume exact."""
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = lambda batch: batch[self.world.rows(len(batch))]  # noqa: E731
        real = rows(self.batches.batch(epoch, index)).to(self.device, memory_format=self.model.memory_format)
        labels = rows(self.batches.labels(epoch, index)).to(self.device) if self.batches.conditioned else None
        return real, labels

    def train_step(self) -> dict[str, float]:
        """The step object's update on this step's batch; the step counter is the caller's."""
        real, labels = self.batch_at(self.step)
        return self.model.train_step(real, labels, self.step, self.progress())

    def train(self, max_steps: int | None = None) -> TrainResult:
        """Train until the configured epochs or max_steps (``max_steps`` here overrides it).

        SIGINT/SIGTERM finish the current step (and its end-of-epoch work), write a checkpoint
        and raise KeyboardInterrupt, so that a resumed run continues exactly as an uninterrupted
        one; a second signal stops at once without saving (the last checkpoint stays valid).
        The run directory is owned for the duration (a second run on it is refused).
        """
        with self._owning_run_dir(), _StopRequests() as stop:
            if self.world.main:
                remove_stale_temporaries(self.run_dir)
            total = self.total_steps if max_steps is None else min(self.planned_steps, max_steps)
            return self._train(stop, total)

    def _train(self, stop: _StopRequests, total: int) -> TrainResult:
        spe, stats = self.steps_per_epoch, {}
        batch = self.config.optim.batch_size
        bar = tqdm(total=total * batch, initial=self.step * batch, unit="pt" if self.config.kind == "toy2d" else "img",
                   unit_scale=True, disable=not (self.config.run.progress and self.world.main), dynamic_ncols=True,
                   mininterval=0.5)
        if self.world.main:
            self.metrics = reporting.MetricsLog(self.run_dir / "metrics.jsonl", self.step)
        self.model.train()
        try:
            while self.step < total:
                epoch = self.step // spe
                stats = self.train_step()
                self._check_finite(stats, epoch)
                self.step += 1
                if self.metrics is not None:
                    self.metrics.write({"step": self.step, "epoch": epoch, **stats})
                bar.set_postfix(epoch=f"{epoch + 1}/{self.config.run.epochs}", refresh=False, **{
                    k: f"{v:.3f}" for k, v in stats.items() if not math.isnan(v)})
                bar.update(batch)
                self._after_step(epoch, total, stop)
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            self.metrics = None
        return TrainResult(self.step, self.step / spe, stats, self.run_dir)

    def _after_step(self, epoch: int, total: int, stop: _StopRequests) -> None:
        """The epoch's end or a checkpoint when one is due; a stop request ends the run here, at
        a step boundary that is the same on every rank, so the checkpoint is exactly this step."""
        spe = self.steps_per_epoch
        saved = self.step % spe == 0 or self.step % self.config.run.checkpoint_every == 0 or self.step == total
        if self.step % spe == 0:
            self.end_of_epoch(epoch)
        elif saved:
            self.save_checkpoint()
        if distributed.any_rank(stop.requested, self.world, self.device):
            if not saved:
                self.save_checkpoint()
            if self.world.main:
                log.warning("stopped by signal at step %d; checkpoint written", self.step)
            raise KeyboardInterrupt

    def _check_finite(self, stats: dict[str, float], epoch: int) -> None:
        bad = self.model.diverged(stats)
        if bad:
            raise TrainingDiverged(
                f"{bad} became {stats[bad]} at step {self.step + 1} (epoch {epoch + 1}); "
                f"stopped without saving, {self.checkpoint_path} holds the last good state. "
                f"Restarting resumes from it: lower optim.lr_d/lr_g or change loss.name first.")

    def end_of_epoch(self, epoch: int) -> None:
        """Sample grid, curves, an evaluation when one is due, then the checkpoint (rank 0 only).

        The evaluation's results (best.pt, then its eval.jsonl record) are durable before the
        checkpoint that moves past this epoch: a crash in between re-runs the epoch's end on
        resume (same figures on CPU) instead of losing the evaluation.
        """
        if not self.world.main:
            return
        self.metrics.flush()
        self.model.save_samples(self.run_dir / "samples" / f"epoch_{epoch + 1:03d}.png", self.step)
        reporting.save_curves(reporting.read_metrics(self.metrics.path), self.run_dir / "curves.png")
        every = self.config.run.eval_every
        if every and (epoch + 1) % every == 0:
            self._evaluate(epoch)
        self.save_checkpoint()

    def _evaluate(self, epoch: int) -> None:
        scores = self.model.evaluate()
        improved = scores["objective"] < self.best_objective
        if improved:
            self.best_objective = scores["objective"]
            checkpoint.save(self.run_dir / checkpoint.BEST_NAME, self.snapshot())
        reporting.record_evaluation(self.run_dir / EVAL_LOG,
                                    {"epoch": epoch + 1, "step": self.step, **scores, "best": improved})
        log.info("epoch %d: %s%s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
                 " (best so far: best.pt)" if improved else "")


def _check_world(config: TrainConfig, world: distributed.World, device: torch.device) -> None:
    size, batch = world.size, config.optim.batch_size
    if batch % size:
        raise ConfigError(f"optim.batch_size = {batch} is the global batch and must divide among the "
                          f"{size} processes of this job")
    if config.run.sync_batchnorm and size > 1 and device.type != "cuda":
        raise ConfigError("run.sync_batchnorm needs CUDA: torch's SyncBatchNorm does not run on CPU (gloo)")
