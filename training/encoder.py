"""An encoder E: image -> z for a trained GAN, and the anomaly score it makes possible (f-AnoGAN).

Schlegl et al. 2019, the izi_f variant: with G and D frozen, E learns to map real images to the
latents that G turns back into them, minimising

    A(x) = ||x - G(E(x))||^2 / n_pixels + kappa * ||f(x) - f(G(E(x)))||^2 / n_features

where f is D's features before its last layer. A(x) is also the anomaly score: an image like the
training data is reconstructed well in pixels and in D's features; off the data manifold neither.
``EncoderStep`` is a step under the same run loop as the GAN (resumable, curves, evaluations);
``AnomalyScorer`` is the module that is exported: image [and class] -> (z, reconstruction, score, logit).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcgan_core import images
from training import checkpoint, reporting
from training.config import ConfigError, TrainConfig
from training.data import derive_seed
from training.models import LAYOUTS, build_models, recalibrate_batchnorm
from training.run_loop import RunContext, RunLoop

FROZEN = ("generator", "discriminator")  # the GAN's networks, kept in the encoder run's checkpoints


class Encoder(nn.Module):
    """images (N, C, S, S) -> z (N, latent): the discriminator's layout (strided convolutions,
    LeakyReLU, BatchNorm after the first) ending in a convolution to ``latent_size`` channels."""

    def __init__(self, channels: int, image_size: int, nef: int, latent_size: int):
        super().__init__()
        start, downs = LAYOUTS[image_size]
        layers: list[nn.Module] = [nn.Conv2d(channels, nef, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = nef
        for _ in range(downs - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        layers.append(nn.Conv2d(width, latent_size, start, 1, 0))
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The last convolution covers the whole feature map, so it is the matrix product it is
        computed as (exported as a MatMul: onnxruntime's 7x7 convolution on a 7x7 map is slow)."""
        last = self.main[-1]
        return self.main[:-1](images).flatten(1) @ last.weight.flatten(1).T + last.bias


class AnomalyScorer(nn.Module):
    """E, G and D together: images [labels] -> (z, reconstruction, anomaly score, D's logit).
    The published ``encoder.onnx`` is this module, so a Score with anomaly runs one network: D's
    trunk sees each image once, for the logit and for the feature residual."""

    def __init__(self, encoder: nn.Module, generator: nn.Module, discriminator: nn.Module, kappa: float):
        super().__init__()
        self.encoder, self.generator, self.discriminator, self.kappa = encoder, generator, discriminator, kappa

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(images)
        reconstruction = self.generator(z, labels)
        features = self.discriminator.features(images)
        return z, reconstruction, self.score(images, features, reconstruction), \
            self.discriminator.logits(features, labels)

    def score(self, images: torch.Tensor, features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """A(x): mean squared pixel residual + kappa * mean squared residual of D's features."""
        pixels = (images - reconstruction).pow(2).flatten(1).mean(1)
        residual = features - self.discriminator.features(reconstruction)
        return pixels + self.kappa * residual.pow(2).flatten(1).mean(1)


def load_source(config: TrainConfig) -> checkpoint.Checkpoint:
    """The trained image GAN named by ``encoder.source`` (read once per encoder run)."""
    if not config.encoder.source:
        raise ConfigError("encoder.source is empty: name the trained GAN's run directory")
    saved = checkpoint.load(Path(config.encoder.source) / config.encoder.checkpoint)
    if saved.model.get("encoder") is not None:
        raise ConfigError(f"encoder.source = {config.encoder.source!r} is an encoder run; name the GAN's run")
    if saved.train_config.kind != "dcgan":
        raise ConfigError(f"encoder.source = {config.encoder.source!r} is a {saved.train_config.kind} run; "
                          f"encoders are for image models")
    return saved


def source_networks(saved: checkpoint.Checkpoint) -> tuple[nn.Module, nn.Module]:
    """The source GAN's sampling G (EMA, BatchNorm re-estimated) and D, both in eval mode with
    gradients off."""
    source = saved.train_config
    generator, discriminator = build_models(source)
    discriminator.load_state_dict(saved.network("discriminator"))
    ema = saved.model.get("ema")
    generator.load_state_dict(ema if ema is not None else saved.network("generator"))
    if ema is not None:
        generator = recalibrate_batchnorm(generator, source.model.latent_size, source.run.seed)
    return generator.eval().requires_grad_(False), discriminator.eval().requires_grad_(False)


def resolve(config: TrainConfig, source: TrainConfig) -> TrainConfig:
    """The encoder run's config: its own run, encoder and optimiser settings on the source GAN's
    data and model (E must see the images G was trained on), the data path as given here."""
    path = config.data.path
    config.data, config.model, config.loss = source.data, source.model, source.loss
    config.data.path = path
    return config


class EncoderStep:
    """E, its optimizer, and the frozen G and D it is trained against."""

    def __init__(self, config: TrainConfig, context: RunContext, source: checkpoint.Checkpoint):
        self.config, self.device = config, context.device
        torch.manual_seed(derive_seed(config.run.seed, 7))
        generator, discriminator = source_networks(source)
        d, m, e = config.data, config.model, config.encoder
        self.memory_format, self.bf16 = torch.preserve_format, False  # E trains in fp32
        self.E = Encoder(d.channels, d.image_size, e.nef, m.latent_size).to(self.device)
        self.scorer = AnomalyScorer(self.E, generator.to(self.device), discriminator.to(self.device), e.kappa)
        self.opt = torch.optim.Adam(self.E.parameters(), e.lr, betas=(config.optim.beta1, config.optim.beta2))
        self._held_out: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def train(self) -> None:
        self.E.train()

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, step: int,
                   progress: float) -> dict[str, float]:
        """One Adam step of E on the izi_f loss of a real batch."""
        self.E.train()  # an evaluation between steps left it in eval mode
        self.opt.zero_grad(set_to_none=True)
        _, reconstruction, scores, _ = self.scorer(real, labels)
        loss = scores.mean()
        loss.backward()
        self.opt.step()
        return {"loss_e": loss.item(), "pixel": (real - reconstruction.detach()).pow(2).mean().item()}

    def diverged(self, stats: dict[str, float]) -> str | None:
        return "loss_e" if not np.isfinite(stats["loss_e"]) else None

    def state_dict(self) -> dict:
        """E and its optimizer, and the frozen networks: an encoder run exports without its source."""
        frozen = {name: getattr(self.scorer, name).state_dict() for name in FROZEN}
        return {"encoder": self.E.state_dict(), "opt_e": self.opt.state_dict(), **frozen}

    def load_state_dict(self, state: dict) -> None:
        self.E.load_state_dict(state["encoder"])
        self.opt.load_state_dict(state["opt_e"])
        for name in FROZEN:
            getattr(self.scorer, name).load_state_dict(state[name])

    @torch.no_grad()
    def scores(self, batch: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions and scores with E in eval mode (its BatchNorm's running statistics)."""
        self.E.eval()
        labels = None if labels is None else labels.to(self.device)
        _, reconstruction, scores, _ = self.scorer(batch.to(self.device), labels)
        return reconstruction, scores

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._held_out is None:
            self._held_out = held_out_images(self.config, self.config.run.eval_samples)
        return self._held_out

    def evaluate(self) -> dict[str, float]:
        """Mean score of held-out real images (lower: E reconstructs unseen digits better) and of
        as many uniform-noise images (higher: what is far from the data stands out)."""
        x, labels = self.held_out()
        _, real = self.scores(x, labels)
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(self.config.run.seed)) * 2 - 1
        _, far = self.scores(noise, labels)
        return {"anomaly_real": float(real.mean()), "anomaly_noise": float(far.mean()),
                "objective": float(real.mean())}

    def save_samples(self, path: Path, step: int) -> None:
        """A row of held-out images over the row of their reconstructions, at ``path`` and as
        samples/latest.png."""
        x, labels = self.held_out()
        count = min(16, self.config.run.sample_count, len(x))
        reconstruction, _ = self.scores(x[:count], None if labels is None else labels[:count])
        for target in (path, path.parent / "latest.png"):
            reporting.save_image_grid(torch.cat([x[:count], reconstruction.cpu()]).numpy(), target, nrow=count)


def held_out_images(config: TrainConfig, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real images E never trained on: the first ``count`` of MNIST's test split, less any digits
    the GAN was trained without (synthetic images for synthetic data), with their classes for
    conditional models."""
    from training.data import load_mnist, synthetic_images

    d = config.data
    if d.dataset == "mnist":
        pixels, labels = load_mnist(Path(d.path), "test")
        kept = ~np.isin(labels, d.hold_out)
        pixels, labels = pixels[kept][:count], labels[kept][:count].astype(np.int64)
    else:
        pixels, labels = synthetic_images(count, d.channels, d.image_size, 1), np.zeros(count, np.int64)
    x = torch.from_numpy(images.uint8_to_model(pixels).reshape(-1, d.channels, d.image_size, d.image_size))
    return x, torch.from_numpy(labels) if config.model.num_classes else None


#: The scorer's outputs, as exported and as the manifest names them.
OUTPUTS = {"latents": "z", "reconstruction": "reconstruction", "score": "anomaly", "logits": "logits"}
CALIBRATION_IMAGES = 5000  # MNIST test digits 0..4999; 5000..9999 stay unseen, for benchmarks and tests


@torch.no_grad()
def calibration(scorer: AnomalyScorer, config: TrainConfig, count: int = CALIBRATION_IMAGES) -> dict:
    """What a score means: the quantiles (0, 0.001, ..., 1) of held-out real images' scores (a
    conditional model's under their classes), so the share of them scoring at most s (its
    percentile) can be read off for any s; for a conditional model also ``class_accuracy``: how
    often the class that reconstructs an image best is its class (the server names that class
    for unlabelled images only when this is high enough)."""
    x, labels = held_out_images(config, count)
    if labels is None:
        scores = _scores_in_chunks(scorer, x, None)
        extra = {}
    else:
        table = torch.stack([_scores_in_chunks(scorer, x, torch.full_like(labels, c))
                             for c in range(config.model.num_classes)])
        scores = table.gather(0, labels[None]).squeeze(0)
        extra = {"class_accuracy": round(float((table.argmin(0) == labels).float().mean()), 4)}
    quantiles = np.quantile(scores.numpy().astype(np.float64), np.linspace(0, 1, 1001))
    source = "MNIST test digits" if config.data.dataset == "mnist" else f"{config.data.dataset} images"
    return {"outputs": OUTPUTS, "kappa": scorer.kappa, "reference": f"the first {len(x)} {source} (held out)",
            "quantiles": [float(f"{q:.6g}") for q in quantiles], **extra}


def _scores_in_chunks(scorer: AnomalyScorer, x: torch.Tensor, labels: torch.Tensor | None,
                      chunk: int = 500) -> torch.Tensor:
    return torch.cat([scorer(x[i : i + chunk], None if labels is None else labels[i : i + chunk])[2]
                      for i in range(0, len(x), chunk)])


def encoder_run(config: TrainConfig, force: bool = False) -> RunLoop:
    """An encoder run: :class:`EncoderStep` under the run loop, on the source GAN's data."""
    if config.kind != "dcgan":
        raise ConfigError("an encoder is for image models; the 2-D toys have none")
    source = load_source(config)
    return RunLoop(resolve(config, source.train_config), partial(EncoderStep, source=source), force=force)
