"""The GAN trainer: alternating D/G updates, EMA generator, checkpoints with exact resume.

One "step" is one discriminator update on one real batch; G is updated every ``optim.d_steps``
steps with D frozen. Batches, latents and RNG state all derive from the config's seed and the
step, which is why N steps + restart + M steps equals N+M steps on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dcgan_core import locking
from dcgan_core.latents import latents
from training import checkpoint, distributed, reporting
from training.config import ConfigError, TrainConfig
from training.data import ImageBatches, ToyBatches, _mix, build_batches, toy_mixture
from training.losses import LOSSES, gradient_penalty, interpolation_shape
from training.models import build_models, recalibrate_batchnorm

log = logging.getLogger(__name__)
METRIC_KEYS = ("loss_d", "loss_g", "d_real", "d_fake", "d_acc")
RUN_LOCK = ".lock"
EVAL_LOG = "eval.jsonl"


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


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether to train under bf16 autocast (weights, optimizer state and exports stay fp32).

    ``auto`` takes it for image models where bf16 runs natively: CUDA, or a CPU with AMX tiles,
    where a preset MNIST step takes half the time of fp32 (bench/results/TUNING.md). The dense
    toy networks stay fp32: their layers are too small to gain, and the ring is sensitive.
    """
    if config.run.precision != "auto":
        return config.run.precision == "bf16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return config.kind == "dcgan" and (device.type == "cuda" or amx)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but CUDA is not available on this machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Trainer:
    """Owns the models, optimizers and run directory of one training run."""

    def __init__(self, config: TrainConfig, force: bool = False,
                 batches: ImageBatches | ToyBatches | None = None):
        self.config = config
        self.run_dir = Path(config.run.run_dir)
        self.device = resolve_device(config.run.device)
        self.world = distributed.join(self.device.type)
        if self.device.type == "cuda" and self.world.size > 1:
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        self._check_world()
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(config.run.seed)
        generator, discriminator = build_models(config)
        self.bf16 = use_bf16(config, self.device)
        memory_format = torch.channels_last if config.kind == "dcgan" else torch.preserve_format
        self.memory_format = memory_format
        self.G = generator.to(self.device, memory_format=memory_format)
        self.D = discriminator.to(self.device, memory_format=memory_format)
        self.ema = copy.deepcopy(self.G).requires_grad_(False) if config.run.ema_decay > 0 else None
        self._join_models()
        o = config.optim
        self.opt_g = torch.optim.Adam(self.G.parameters(), o.lr_g, betas=(o.beta1, o.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), o.lr_d, betas=(o.beta1, o.beta2))
        self.loss = LOSSES[config.loss.name]
        self.noise = torch.Generator(self.device).manual_seed(_mix(config.run.seed, 1))
        self.classes = config.model.num_classes
        self.batches = batches or build_batches(config)
        self.steps_per_epoch = self.batches.steps_per_epoch
        if self.classes:
            self._adopt_class_names(self.batches.class_names)
            self.fake_label_weights = self.batches.class_frequencies().to(self.device)
        self.fixed_noise, self.fixed_labels = self._fixed_grid_inputs()
        self.step = 0
        self.g_steps = 0
        self.last_loss_g = float("nan")
        self.best_objective = math.inf  # lowest objective of the in-training evaluations so far
        self._reference = None  # metrics.ImageReference, loaded at the first evaluation
        self.checkpoint_path = self.run_dir / checkpoint.CHECKPOINT_NAME
        self.metrics: reporting.MetricsLog | None = None  # open only inside train()
        with self._owning_run_dir():
            pass  # in use by another trainer: say so before anything else (train() holds it)
        if self.checkpoint_path.exists():
            self._resume(force)

    def _check_world(self) -> None:
        size, batch = self.world.size, self.config.optim.batch_size
        if batch % size:
            raise ConfigError(f"optim.batch_size = {batch} is the global batch and must divide among the "
                              f"{size} processes of this job")
        if self.config.run.sync_batchnorm and size > 1 and self.device.type != "cuda":
            raise ConfigError("run.sync_batchnorm needs CUDA: torch's SyncBatchNorm does not run on CPU (gloo)")

    def _join_models(self) -> None:
        """Under torchrun: rank 0's weights everywhere, SyncBatchNorm if asked, and a torch RNG of
        each rank's own (the EMA copy keeps plain BatchNorm: it is only run by rank 0)."""
        if self.world.size == 1:
            return
        distributed.broadcast_module(self.G, self.world)
        distributed.broadcast_module(self.D, self.world)
        if self.config.run.sync_batchnorm:
            self.G = nn.SyncBatchNorm.convert_sync_batchnorm(self.G)
            self.D = nn.SyncBatchNorm.convert_sync_batchnorm(self.D)
        torch.manual_seed(_mix(self.config.run.seed, 1000 + self.world.rank))

    def _owning_run_dir(self) -> contextlib.AbstractContextManager:
        """The run directory's lock, held by rank 0 alone (the one process that writes there)."""
        if not self.world.main:
            return contextlib.nullcontext()
        return locking.exclusive(self.run_dir / RUN_LOCK, f"run directory {self.run_dir}")

    def _adopt_class_names(self, names: list[str]) -> None:
        """The data's class names go into the config (and so the checkpoint and the manifest)."""
        configured = self.config.model.class_names
        if configured and list(configured) != list(names):
            raise ConfigError(f"model.class_names = {configured} but the data's classes are {names}")
        self.config.model.class_names = list(names)

    def _fixed_grid_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents (and labels) of the fixed-noise grid: for a conditional model, one row per class
        with the same latents in every row, so a column shows one z across the classes."""
        run, size = self.config.run, self.config.model.latent_size
        if not self.classes:
            return torch.from_numpy(latents(run.seed, run.sample_count, size)).to(self.device), None
        z = torch.from_numpy(latents(run.seed, self.grid_columns, size)).repeat(self.classes, 1)
        labels = torch.arange(self.classes).repeat_interleave(self.grid_columns)
        return z.to(self.device), labels.to(self.device)

    @property
    def grid_columns(self) -> int:
        return max(4, self.config.run.sample_count // max(1, self.classes))

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "g_steps": self.g_steps,
            "last_loss_g": self.last_loss_g,
            "best_objective": self.best_objective,
            "steps_per_epoch": self.steps_per_epoch,
            "generator": self.G.state_dict(),
            "discriminator": self.D.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "noise_rng": self.noise.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self) -> None:
        if not self.world.main:
            return
        if self.metrics is not None:
            self.metrics.flush()
        checkpoint.save(self.checkpoint_path, self.state())

    def _resume(self, force: bool) -> None:
        state = checkpoint.load(self.checkpoint_path, self.device)
        checkpoint.check_compatible(state, self.config, self.checkpoint_path, force)
        if state["steps_per_epoch"] != self.steps_per_epoch and not force:
            raise checkpoint.CheckpointError(
                f"{self.checkpoint_path}: the data gives {self.steps_per_epoch} steps per epoch, "
                f"the checkpoint {state['steps_per_epoch']}; refusing to resume on other data")
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.noise.set_state(state["noise_rng"].cpu() if not self.cuda else state["noise_rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step, self.g_steps, self.last_loss_g = state["step"], state["g_steps"], state["last_loss_g"]
        self.best_objective = state.get("best_objective", state.get("best_fd", math.inf))  # best_fd: before toys
        log.info("resumed %s at step %d", self.checkpoint_path, self.step)

    # ------------------------------------------------------------------ one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _latents(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.config.model.latent_size, generator=self.noise, device=self.device)

    def _fake_labels(self, count: int) -> torch.Tensor | None:
        """Classes of a fake batch, drawn with the data's class frequencies (None: unconditional,
        and then no draw, so unconditional runs keep their random streams)."""
        if not self.classes:
            return None
        return torch.multinomial(self.fake_label_weights, count, replacement=True, generator=self.noise)

    def _mine(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's rows of a tensor drawn for the global batch (all of it in one process)."""
        return None if batch is None else batch[self.world.rows(len(batch))]

    def train_step(self, real: torch.Tensor, real_labels: torch.Tensor | None = None) -> dict[str, float]:
        """One D update on ``real`` and, every d_steps, one G update (D frozen). A conditional
        model's D sees each batch with its labels: real ones for real images, drawn ones for fakes.
        Under torchrun ``real`` is this rank's share; the noise is drawn for the global batch."""
        update_g = (self.step + 1) % self.config.optim.d_steps == 0
        batch = real.shape[0] * self.world.size
        fake_labels = self._mine(self._fake_labels(batch))
        with self._autocast():
            with torch.set_grad_enabled(update_g):
                fake = self.G(self._mine(self._latents(batch)), fake_labels)
            real_logits = self.D(real, real_labels).float()
            fake_logits = self.D(fake.detach(), fake_labels).float()
            loss_d = self.loss.d_loss(real_logits, fake_logits, 1.0 - self.config.loss.label_smoothing)
        if self.loss.gradient_penalty:  # interpolates of a real and a fake image keep the real label
            critic = lambda x: self.D(x, real_labels)  # noqa: E731
            alpha = torch.rand(interpolation_shape(real, batch), generator=self.noise, device=real.device,
                               dtype=real.dtype)
            loss_d = loss_d + self.config.loss.gp_weight * gradient_penalty(
                critic, real, fake.detach().to(real.dtype), alpha=self._mine(alpha))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        distributed.average_gradients(self.D, self.world)
        self._set_lr(self.opt_d, self.config.optim.lr_d)
        self.opt_d.step()
        if update_g:
            self._generator_step(fake, fake_labels)
        with torch.no_grad():
            stats = torch.stack([
                loss_d.detach(), torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean(),
                ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2])
        loss_d_value, d_real, d_fake, d_acc = distributed.mean(stats, self.world).tolist()
        return {"loss_d": loss_d_value, "loss_g": self.last_loss_g, "d_real": d_real,
                "d_fake": d_fake, "d_acc": d_acc}

    def _generator_step(self, fake: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.D.requires_grad_(False)
        with self._autocast():
            loss_g = self.loss.g_loss(self._top_k(self.D(fake, labels).float()))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        distributed.average_gradients(self.G, self.world)
        self._set_lr(self.opt_g, self.config.optim.lr_g)
        self.opt_g.step()
        self.D.requires_grad_(True)
        self.g_steps += 1
        self.last_loss_g = distributed.mean(loss_g.detach().clone(), self.world).item()
        self._update_ema()

    def _top_k(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """The logits G learns from (Sinha et al. 2020, top-k training): the samples D rates least
        real pull G towards averages of modes, so late in training only the best share counts.
        The share falls linearly from 1 to ``loss.top_k`` over the run, like the learning rate."""
        target = self.config.loss.top_k
        if target >= 1.0:
            return fake_logits
        k = max(1, math.ceil(len(fake_logits) * (1.0 - self._progress() * (1.0 - target))))
        return fake_logits.topk(k).values

    def _progress(self) -> float:
        """Share of the run done, 0 to 1: a pure function of the step (no scheduler state), so a
        resumed run follows exactly the schedules of an uninterrupted one. The length is the
        configured epochs (``run.max_steps`` only stops a run early)."""
        return min(1.0, self.step / self.planned_steps)

    def _set_lr(self, optimizer: torch.optim.Optimizer, base_lr: float) -> None:
        """Apply the decay schedule (see :meth:`_progress`)."""
        scale = 1.0 - self._progress() if self.config.optim.lr_decay == "linear" else 1.0
        for group in optimizer.param_groups:
            group["lr"] = base_lr * scale

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of G's weights with a warm-up, so early samples are not dominated by the init."""
        if self.ema is None:
            return
        decay = min(self.config.run.ema_decay, (1 + self.g_steps) / (10 + self.g_steps))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, list(self.G.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.G.buffers()):
            ema_buffer.copy_(buffer)

    # ------------------------------------------------------------------ loop

    @property
    def planned_steps(self) -> int:
        """Steps in the configured epochs: the length the schedules are drawn over."""
        return self.config.run.epochs * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Steps this run will take: the planned ones, or fewer if ``run.max_steps`` says so."""
        planned, limit = self.planned_steps, self.config.run.max_steps
        return min(planned, limit) if limit else planned

    def train(self) -> TrainResult:
        """Train until the configured epochs or max_steps.

        SIGINT/SIGTERM finish the current step (and its end-of-epoch work), write a checkpoint
        and raise KeyboardInterrupt, so that a resumed run continues exactly as an uninterrupted
        one; a second signal stops at once without saving (the last checkpoint stays valid).
        The run directory is owned for the duration (a second trainer on it is refused).
        """
        with self._owning_run_dir(), _StopRequests() as stop:
            if self.world.main:
                remove_stale_temporaries(self.run_dir)
            return self._train(stop)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's real images (and labels, for a conditional model) of a global step, ready for
        :meth:`train_step`: the order is a function of the step, which is what makes resume exact."""
        epoch, index = divmod(step, self.steps_per_epoch)
        real = self._mine(self.batches.batch(epoch, index)).to(self.device, memory_format=self.memory_format)
        labels = self._mine(self.batches.labels(epoch, index)).to(self.device) if self.classes else None
        return real, labels

    def _train(self, stop: "_StopRequests") -> TrainResult:
        total, spe = self.total_steps, self.steps_per_epoch
        stats: dict[str, float] = {}
        unit = "img" if self.config.kind == "dcgan" else "pt"
        batch = self.config.optim.batch_size
        bar = tqdm(total=total * batch, initial=self.step * batch, unit=unit, unit_scale=True,
                   disable=not (self.config.run.progress and self.world.main), dynamic_ncols=True, mininterval=0.5)
        if self.world.main:
            self.metrics = reporting.MetricsLog(self.run_dir / "metrics.jsonl", self.step)
        self.G.train()
        self.D.train()
        try:
            while self.step < total:
                epoch = self.step // spe
                real, labels = self.batch_at(self.step)
                stats = self.train_step(real) if labels is None else self.train_step(real, labels)
                self._check_finite(stats, epoch)
                self.step += 1
                if self.metrics is not None:
                    self.metrics.write({"step": self.step, "epoch": epoch, **stats})
                bar.set_postfix(epoch=f"{epoch + 1}/{self.config.run.epochs}", refresh=False, **{
                    k: f"{v:.3f}" for k, v in stats.items() if k != "loss_g" or not math.isnan(v)})
                bar.update(batch)
                saved = self.step % spe == 0 or self.step % self.config.run.checkpoint_every == 0 \
                    or self.step == total
                if self.step % spe == 0:
                    self.end_of_epoch(epoch)
                elif saved:
                    self.save_checkpoint()
                if distributed.any_rank(stop.requested, self.world, self.device):
                    # at a step boundary, the same one on every rank: the checkpoint is exactly this step
                    if not saved:
                        self.save_checkpoint()
                    if self.world.main:
                        log.warning("stopped by signal at step %d; checkpoint written", self.step)
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            self.metrics = None
        return TrainResult(self.step, self.step / spe, stats, self.run_dir)

    def _check_finite(self, stats: dict[str, float], epoch: int) -> None:
        bad = [k for k in ("loss_d", "loss_g") if math.isinf(stats[k]) or
               (math.isnan(stats[k]) and (k == "loss_d" or self.g_steps > 0))]
        if bad:
            raise TrainingDiverged(
                f"{bad[0]} became {stats[bad[0]]} at step {self.step + 1} (epoch {epoch + 1}); "
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
        self.save_samples(self.run_dir / "samples" / f"epoch_{epoch + 1:03d}.png")
        reporting.save_curves(reporting.read_metrics(self.metrics.path), self.run_dir / "curves.png")
        every = self.config.run.eval_every
        if every and (epoch + 1) % every == 0:
            scores = self.evaluate()
            improved = scores["objective"] < self.best_objective
            if improved:
                self.best_objective = scores["objective"]
                checkpoint.save(self.run_dir / checkpoint.BEST_NAME, self.state())
            reporting.record_evaluation(self.run_dir / EVAL_LOG,
                                        {"epoch": epoch + 1, "step": self.step, **scores, "best": improved})
            log.info("epoch %d: %s%s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
                     " (best so far: best.pt)" if improved else "")
        self.save_checkpoint()

    def evaluate(self) -> dict[str, float]:
        """Metrics of ``run.eval_samples`` samples from fixed latents, so that epochs compare, and
        the ``objective`` by which the best epoch is kept (GANs do not improve monotonically):
        FD for images; for toys the missing modes plus the share of low-quality samples, so that
        a generator that sharpened by dropping a mode never wins. Uses no training RNG: a run with
        evaluations trains exactly as one without."""
        from training import metrics  # the classifier is only needed here

        count = self.config.run.eval_samples
        z = latents(self.config.run.seed, count, self.config.model.latent_size)
        labels = np.arange(count) % self.classes if self.classes else None  # balanced classes
        samples = self.generate(torch.from_numpy(z).to(self.device),
                                None if labels is None else torch.from_numpy(labels).to(self.device))
        if self.config.kind == "toy2d":
            toy = metrics.toy_metrics(samples, toy_mixture(self.config.data.dataset))
            missing = toy["modes"] - toy["modes_covered"]
            scores = {key: float(toy[key]) for key in ("modes_covered", "high_quality", "reverse_kl")}
            return {**scores, "objective": missing + 1.0 - toy["high_quality"]}
        if self._reference is None:
            self._reference = metrics.ImageReference.load(Path(self.config.data.path),
                                                          progress=self.config.run.progress)
        result = metrics.evaluate_images(samples, self._reference, labels=labels)
        keys = ("fd", "is", "coverage_min", "coverage_max") + (("consistency", "consistency_min") if self.classes else ())
        scores = {key: float(result[key]) for key in keys}
        return {**scores, "objective": scores["fd"]}

    def sampling_generator(self) -> nn.Module:
        """The generator to sample and export: EMA weights with their own BatchNorm statistics."""
        if self.ema is None:
            return copy.deepcopy(self.G).eval()
        return recalibrate_batchnorm(self.ema, self.config.model.latent_size, self.config.run.seed)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> np.ndarray:
        """Samples of :meth:`sampling_generator` in eval mode, as float32 numpy."""
        return self.sampling_generator()(z, labels).float().cpu().numpy()

    def save_samples(self, path: Path) -> None:
        """The fixed-noise grid (toys: a scatter plot) at ``path`` and as samples/latest.png; a
        conditional model's grid has one row per class, labelled with the class name."""
        if self.config.kind == "dcgan":
            samples = self.generate(self.fixed_noise, self.fixed_labels)
        else:
            samples = self.generate(self._toy_noise())
        for target in (path, path.parent / "latest.png"):
            if self.config.kind == "dcgan" and self.classes:
                reporting.save_image_grid(samples, target, nrow=self.grid_columns,
                                          row_labels=self.config.model.class_names)
            elif self.config.kind == "dcgan":
                reporting.save_image_grid(samples, target)
            else:
                modes = toy_mixture(self.config.data.dataset).means
                reporting.save_toy_scatter(samples, modes, target, f"step {self.step}")

    def _toy_noise(self) -> torch.Tensor:
        z = latents(self.config.run.seed, 2048, self.config.model.latent_size)
        return torch.from_numpy(z).to(self.device)
