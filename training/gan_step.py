"""One optimisation step of a GAN: the algorithm, apart from the run loop that drives it.

``GANStep.train_step`` makes one discriminator update on one real batch and, every
``optim.d_steps`` steps, one generator update with D frozen; an EMA of G's weights follows. The
step owns what a checkpoint must hold to continue exactly (networks, EMA, optimizers, the noise
stream), and its schedules (learning-rate decay, top-k) are functions of the run's progress, which
the loop passes in: a resumed run follows them exactly. ``gan_run`` puts it under the run loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcgan_core.latents import latents
from training import distributed, reporting
from training.config import TrainConfig
from training.data import ImageBatches, ToyBatches, derive_seed, toy_mixture
from training.losses import LOSSES, gradient_penalty, interpolation_shape
from training.models import build_models, recalibrate_batchnorm
from training.run_loop import RunContext, RunLoop, set_learning_rate


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


class GANStep:
    """G, D, the EMA generator, their optimizers and the noise stream of one GAN."""

    def __init__(self, config: TrainConfig, context: RunContext):
        self.config, self.device, self.world = config, context.device, context.world
        torch.manual_seed(config.run.seed)
        generator, discriminator = build_models(config)
        self.bf16 = use_bf16(config, self.device)
        self.memory_format = torch.channels_last if config.kind == "dcgan" else torch.preserve_format
        self.G = generator.to(self.device, memory_format=self.memory_format)
        self.D = discriminator.to(self.device, memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.G).requires_grad_(False) if config.run.ema_decay > 0 else None
        self._join_models()
        o = config.optim
        self.opt_g = torch.optim.Adam(self.G.parameters(), o.lr_g, betas=(o.beta1, o.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), o.lr_d, betas=(o.beta1, o.beta2))
        self.loss = LOSSES[config.loss.name]
        self.noise = torch.Generator(self.device).manual_seed(derive_seed(config.run.seed, 1))
        self.classes = config.model.num_classes
        self.fake_label_weights = context.class_frequencies.to(self.device) if self.classes else None
        self.fixed_noise, self.fixed_labels = self._fixed_grid_inputs()
        self.g_steps = 0
        self.last_loss_g = float("nan")
        self._reference = None  # metrics.ImageReference, loaded at the first evaluation

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
        torch.manual_seed(derive_seed(self.config.run.seed, 1000 + self.world.rank))

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

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "noise_rng": self.noise.get_state(), "g_steps": self.g_steps, "last_loss_g": self.last_loss_g}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.noise.set_state(state["noise_rng"].cpu() if self.device.type != "cuda" else state["noise_rng"])
        self.g_steps, self.last_loss_g = state["g_steps"], state["last_loss_g"]

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

    def train_step(self, real: torch.Tensor, real_labels: torch.Tensor | None, step: int,
                   progress: float) -> dict[str, float]:
        """Step ``step`` (0-based): one D update on ``real`` and, every d_steps, one G update (D
        frozen). A conditional model's D sees each batch with its labels: real ones for real
        images, drawn ones for fakes. Under torchrun ``real`` is this rank's share; the noise is
        drawn for the global batch. ``progress`` (0..1) drives the schedules."""
        update_g = (step + 1) % self.config.optim.d_steps == 0
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
        set_learning_rate(self.opt_d, self.config.optim.lr_d, progress, self.config.optim.lr_decay)
        self.opt_d.step()
        if update_g:
            self._generator_step(fake, fake_labels, progress)
        with torch.no_grad():
            stats = torch.stack([
                loss_d.detach(), torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean(),
                ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2])
        loss_d_value, d_real, d_fake, d_acc = distributed.mean(stats, self.world).tolist()
        return {"loss_d": loss_d_value, "loss_g": self.last_loss_g, "d_real": d_real,
                "d_fake": d_fake, "d_acc": d_acc}

    def _generator_step(self, fake: torch.Tensor, labels: torch.Tensor | None, progress: float) -> None:
        self.D.requires_grad_(False)
        with self._autocast():
            loss_g = self.loss.g_loss(self._top_k(self.D(fake, labels).float(), progress))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        distributed.average_gradients(self.G, self.world)
        set_learning_rate(self.opt_g, self.config.optim.lr_g, progress, self.config.optim.lr_decay)
        self.opt_g.step()
        self.D.requires_grad_(True)
        self.g_steps += 1
        self.last_loss_g = distributed.mean(loss_g.detach().clone(), self.world).item()
        self._update_ema()

    def _top_k(self, fake_logits: torch.Tensor, progress: float) -> torch.Tensor:
        """The logits G learns from (Sinha et al. 2020, top-k training): the samples D rates least
        real pull G towards averages of modes, so late in training only the best share counts.
        The share falls linearly from 1 to ``loss.top_k`` over the run, like the learning rate."""
        target = self.config.loss.top_k
        if target >= 1.0:
            return fake_logits
        k = max(1, math.ceil(len(fake_logits) * (1.0 - progress * (1.0 - target))))
        return fake_logits.topk(k).values

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

    def diverged(self, stats: dict[str, float]) -> str | None:
        """The loss that became NaN or infinite, if any (loss_g is NaN until G's first update)."""
        return next((k for k in ("loss_d", "loss_g") if math.isinf(stats[k]) or
                     (math.isnan(stats[k]) and (k == "loss_d" or self.g_steps > 0))), None)

    # ------------------------------------------------------------------ what the loop shows and keeps

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
        keys = ("fd", "is", "coverage_min", "coverage_max")
        keys += ("consistency", "consistency_min") if self.classes else ()
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

    def save_samples(self, path: Path, step: int) -> None:
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
                reporting.save_toy_scatter(samples, modes, target, f"step {step}")

    def _toy_noise(self) -> torch.Tensor:
        z = latents(self.config.run.seed, 2048, self.config.model.latent_size)
        return torch.from_numpy(z).to(self.device)

    def train(self) -> None:
        self.G.train()
        self.D.train()


def gan_run(config: TrainConfig, force: bool = False,
            batches: ImageBatches | ToyBatches | None = None) -> RunLoop:
    """A GAN training run: :class:`GANStep` under the run loop (resumes the run directory's
    checkpoint; ``force`` resumes it under a changed config)."""
    return RunLoop(config, GANStep, force=force, batches=batches)
