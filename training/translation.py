"""Image-to-image translation (pix2pix, Isola et al. 2017): a U-Net G from a source image to a
target image and a PatchGAN D on (source, target) pairs, trained on

    loss_G = GAN loss of D(source, G(source))  +  l1_weight * |G(source) - target|_1

``TranslationStep`` is a third step under the run loop (beside the GAN's and the encoder's):
resumable, with progress, curves, grids of source | output | target and in-training evaluation.
The data: MNIST tasks made on the fly (``mnist-sr4``: the 4x4 block mean of a digit, 7x7, to the
digit; ``mnist-edges``: the digit's outline to the digit) and users' paired folders in pix2pix's
aligned format (A and B side by side in one image). ``loss.adversarial = false`` trains the same
U-Net on L1 alone: the baseline that shows what the discriminator adds.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dcgan_core import images, publishing
from training import reporting
from training.config import ConfigError, TrainConfig
from training.data import DataError, ImageBatches, image_paths, load_mnist
from training.losses import LOSSES
from training.run_loop import RunContext, RunLoop, set_learning_rate

log = logging.getLogger(__name__)
SR_FACTOR = 4  # mnist-sr4: a 28x28 digit from its 7x7 block means
EVAL_OFFSET = 5000  # MNIST test digits 5000..: evaluations, exports' figures and bench/translation.py
GRID_COLUMNS = 16


# --------------------------------------------------------------------------- the MNIST tasks


def block_mean(targets: np.ndarray, factor: int = SR_FACTOR) -> np.ndarray:
    """mnist-sr4's source: the mean of each ``factor`` x ``factor`` block (model range in and out:
    the scaling to [-1, 1] is affine, so the mean of scaled pixels is the scaled mean)."""
    n, c, h, w = targets.shape
    return targets.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5)).astype(np.float32)


def edge_map(targets: np.ndarray) -> np.ndarray:
    """mnist-edges' source: the morphological gradient of the digit, max - min of each pixel's 3x3
    neighbourhood (zero outside the image), in the model range. It marks both sides of every
    stroke (a thin outline, one to two pixels wide, with the stroke's inside dark) and is exact and
    cheap in numpy; the generator has to fill the strokes back in."""
    unit = (targets + 1.0) / 2.0  # [0, 1]
    padded = np.pad(unit, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = unit.shape[-2:]
    high, low = unit.copy(), unit.copy()
    for i in range(3):
        for j in range(3):
            np.maximum(high, padded[..., i:i + h, j:j + w], out=high)
            np.minimum(low, padded[..., i:i + h, j:j + w], out=low)
    return (2.0 * (high - low) - 1.0).astype(np.float32)


SOURCES = {"mnist-sr4": block_mean, "mnist-edges": edge_map}


def mnist_pairs(config: TrainConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(sources, targets) of an MNIST task, model range, float32 NCHW."""
    pixels, _ = load_mnist(Path(config.data.path), split, config.data.download)
    targets = images.uint8_to_model(pixels)
    return SOURCES[config.data.dataset](targets), targets


def held_out_pairs(config: TrainConfig, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sources, targets, digit labels) of MNIST test digits 5000.. (never trained on); a paired
    folder's val (else test) split, or its train split with a warning when it has neither."""
    if config.data.dataset in SOURCES:
        pixels, labels = load_mnist(Path(config.data.path), "test")
        targets = images.uint8_to_model(pixels[EVAL_OFFSET:EVAL_OFFSET + count])
        return SOURCES[config.data.dataset](targets), targets, labels[EVAL_OFFSET:EVAL_OFFSET + count]
    for split in ("val", "test", "train"):
        if (Path(config.data.path) / split).is_dir():
            if split == "train":
                log.warning("%s has no val/ or test/ folder: evaluating on train/, which is not held out",
                            config.data.path)
            sources, targets = paired_folder(config, split)
            return sources[:count], targets[:count], np.zeros(min(count, len(targets)), np.int64)
    raise DataError(f"{config.data.path} has no val, test or train folder")


# --------------------------------------------------------------------------- paired folders


def paired_folder(config: TrainConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(sources, targets) of ``data.path/split``: pix2pix's aligned format, A | B side by side in
    one image; A -> B unless ``data.direction`` is BtoA. Each half is resized to the image size."""
    d = config.data
    folder = Path(d.path) / split
    if not folder.is_dir():
        raise DataError(f"paired data: {folder} does not exist (expected {Path(d.path)}/train, val, test)")
    halves = []
    for path in image_paths(folder):
        try:
            with Image.open(path) as img:
                img = images.to_8bit(img, d.channels)
                w, h = img.size
                if w < 2:
                    raise ValueError("narrower than two pixels")
                a, b = img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, 2 * (w // 2), h))
                halves.append([images.pil_to_chw(images.center_crop_resize(x, d.image_size)) for x in (a, b)])
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"paired data: {path}: {exc}") from None
    if not halves:
        raise DataError(f"paired data: no images in {folder}")
    a, b = (images.uint8_to_model(np.stack(side)) for side in zip(*halves))
    return (a, b) if d.direction == "AtoB" else (b, a)


def translation_batches(config: TrainConfig) -> ImageBatches:
    """Targets, with each row's source as its condition (what ``RunLoop.batch_at`` hands a step)."""
    sources, targets = (mnist_pairs(config) if config.data.dataset in SOURCES else paired_folder(config))
    return ImageBatches(torch.from_numpy(targets), config.optim.batch_size, config.run.seed,
                        labels=torch.from_numpy(sources))


def source_size(config: TrainConfig) -> int:
    return config.data.image_size // SR_FACTOR if config.data.dataset == "mnist-sr4" else config.data.image_size


# --------------------------------------------------------------------------- networks


class UNet(nn.Module):
    """source (N, C, s, s) -> target (N, C, S, S) in [-1, 1]: the source is resized to S (nearest),
    encoded by two strided convolutions, passed through a 3x3 bottleneck and decoded by two
    transposed convolutions, each joined by the encoder's map of the same size (U-Net skips);
    a last 3x3 convolution also sees the resized source itself."""

    def __init__(self, channels: int, image_size: int, ngf: int):
        super().__init__()
        self.image_size = image_size
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.down1 = nn.Sequential(nn.Conv2d(channels, ngf, 4, 2, 1), act())
        self.down2 = nn.Sequential(nn.Conv2d(ngf, ngf * 2, 4, 2, 1), act())
        self.middle = nn.Sequential(nn.Conv2d(ngf * 2, ngf * 2, 3, 1, 1), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(ngf * 4, ngf, 4, 2, 1), nn.ReLU(inplace=True))
        self.up1 = nn.Sequential(nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Conv2d(ngf + channels, channels, 3, 1, 1), nn.Tanh())

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = self.resized(source)
        d1 = self.down1(x)
        d2 = self.down2(d1)
        u2 = self.up2(torch.cat([self.middle(d2), d2], 1))
        u1 = self.up1(torch.cat([u2, d1], 1))
        return self.out(torch.cat([u1, x], 1))

    def resized(self, source: torch.Tensor) -> torch.Tensor:
        return resize_to(source, self.image_size)


def resize_to(source: torch.Tensor, size: int) -> torch.Tensor:
    """``source`` at ``size`` x ``size`` (nearest: each source pixel becomes a block)."""
    return source if source.shape[-1] == size else F.interpolate(source, size=(size, size), mode="nearest")


class PatchDiscriminator(nn.Module):
    """(source, image) -> a logit per overlapping patch (PatchGAN): the pair is judged locally, so
    D looks at texture and strokes while L1 keeps the whole image near its target. Spectral norm,
    no BatchNorm (as the project's image D). ``forward`` gives the mean patch logit per pair."""

    def __init__(self, channels: int, image_size: int, ndf: int):
        super().__init__()
        self.image_size = image_size
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.main = nn.Sequential(
            spectral_norm(nn.Conv2d(2 * channels, ndf, 4, 2, 1)), act(),
            spectral_norm(nn.Conv2d(ndf, ndf * 2, 4, 2, 1)), act(),
            spectral_norm(nn.Conv2d(ndf * 2, ndf * 2, 3, 1, 1)), act(),
            spectral_norm(nn.Conv2d(ndf * 2, 1, 3, 1, 1)))

    def patches(self, images: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.main(torch.cat([resize_to(source, self.image_size), images], 1)).flatten(1)

    def forward(self, images: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.patches(images, source).mean(1)


def build_translation_models(config: TrainConfig) -> tuple[UNet, PatchDiscriminator]:
    d, m = config.data, config.model
    return UNet(d.channels, d.image_size, m.ngf), PatchDiscriminator(d.channels, d.image_size, m.ndf)


# --------------------------------------------------------------------------- the step


class TranslationStep:
    """G (U-Net), D (PatchGAN; unused when ``loss.adversarial`` is off) and their optimizers."""

    def __init__(self, config: TrainConfig, context: RunContext):
        self.config, self.device = config, context.device
        if context.world.size > 1:
            raise ConfigError("translation models train in one process (torchrun is for the GAN)")
        torch.manual_seed(config.run.seed)
        generator, discriminator = build_translation_models(config)
        self.G, self.D = generator.to(self.device), discriminator.to(self.device)
        self.memory_format, self.bf16 = torch.preserve_format, False
        o = config.optim
        self.opt_g = torch.optim.Adam(self.G.parameters(), o.lr_g, betas=(o.beta1, o.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), o.lr_d, betas=(o.beta1, o.beta2))
        self.loss = LOSSES[config.loss.name]
        self._held_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reference = None  # metrics.ImageReference, at the first evaluation

    def train(self) -> None:
        self.G.train()
        self.D.train()

    def train_step(self, target: torch.Tensor, source: torch.Tensor | None, step: int,
                   progress: float) -> dict[str, float]:
        """One D update on (source, target) vs (source, G(source)), then one G update."""
        adversarial = self.config.loss.adversarial
        fake = self.G(source)
        loss_d = torch.zeros((), device=self.device)
        if adversarial:
            real_logits = self.D.patches(target, source)
            fake_logits = self.D.patches(fake.detach(), source)
            loss_d = self.loss.d_loss(real_logits, fake_logits, 1.0 - self.config.loss.label_smoothing)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            set_learning_rate(self.opt_d, self.config.optim.lr_d, progress, self.config.optim.lr_decay)
            self.opt_d.step()
        l1 = (fake - target).abs().mean()
        loss_g = self.config.loss.l1_weight * l1
        if adversarial:
            self.D.requires_grad_(False)
            loss_g = loss_g + self.loss.g_loss(self.D.patches(fake, source))
            self.D.requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        set_learning_rate(self.opt_g, self.config.optim.lr_g, progress, self.config.optim.lr_decay)
        self.opt_g.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "l1": l1.item()}

    def diverged(self, stats: dict[str, float]) -> str | None:
        return next((k for k in ("loss_d", "loss_g") if not math.isfinite(stats[k])), None)

    def state_dict(self) -> dict:
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "ema": None}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    @torch.no_grad()
    def translate(self, sources: np.ndarray) -> np.ndarray:
        self.G.eval()
        out = translate_all(torch_translator(self.G, self.device), sources)
        self.G.train()
        return out

    def held_out(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._held_out is None:
            self._held_out = held_out_pairs(self.config, self.config.run.eval_samples)
        return self._held_out

    def evaluate(self) -> dict[str, float]:
        """On held-out pairs: L1 and PSNR against the targets, the share whose digit the MNIST
        classifier still reads as the target's, and FD of the outputs against the test digits
        (the objective: a blurry average keeps the class and a good PSNR but not the FD)."""
        from training import metrics

        sources, targets, labels = self.held_out()
        if self._reference is None and self.config.data.dataset in SOURCES:
            self._reference = metrics.ImageReference.load(Path(self.config.data.path),
                                                          progress=self.config.run.progress)
        scores = measure(self.translate(sources), targets, labels, self._reference)
        return {**scores, "objective": scores.get("fd", scores["l1"])}

    def save_samples(self, path: Path, step: int) -> None:
        """Rows of source (resized to the output's size) | output | target, at ``path`` and as
        samples/latest.png."""
        sources, targets, _ = self.held_out()
        count = min(GRID_COLUMNS, len(targets))
        with torch.no_grad():
            shown = self.G.resized(torch.from_numpy(sources[:count])).numpy()
        grid = np.concatenate([shown, self.translate(sources[:count]), targets[:count]])
        for target in (path, path.parent / "latest.png"):
            reporting.save_image_grid(grid, target, nrow=count)


#: How a translation version's figures are measured: held-out test digits 5000..5000+samples.
PROTOCOL = {"samples": 5000, "seed": 0}


def figures(translate, config: TrainConfig, data_dir: Path, protocol: dict[str, int] = PROTOCOL) -> dict:
    """A translation version's figures: ``translate`` (model-range sources -> outputs) on the
    held-out pairs of an MNIST task: FD against the test digits, and ``fd_floor``, the FD of the
    pairs' own targets against them (digits 5000..9999 are the harder half of MNIST's test set:
    7.97, where 5,000 training digits give 3.09; a perfect translator scores the floor), class
    kept, PSNR, L1. Paired folders have no classifier to read them: {}."""
    from training import metrics

    if config.data.dataset not in SOURCES:
        return {}
    config = copy.deepcopy(config)
    config.data.path = str(data_dir)
    sources, targets, labels = held_out_pairs(config, protocol["samples"])
    reference = metrics.ImageReference.load(data_dir, progress=False)
    scores = measure(translate_all(translate, sources), targets, labels, reference)
    fd_floor = float(metrics.evaluate_images(targets, reference, ["fd"])["fd"])
    return {**scores, "fd_floor": fd_floor, "samples": len(targets), publishing.PROTOCOL: dict(protocol)}


def measure(outputs: np.ndarray, targets: np.ndarray, labels: np.ndarray, reference=None) -> dict[str, float]:
    """L1 and PSNR of translations against their targets; with a ``reference`` (MNIST's
    metrics.ImageReference) also the share the classifier reads as the target's digit and the FD
    of the outputs against the test set."""
    from training import classifier, metrics

    scores = {"l1": float(np.abs(outputs - targets).mean()), "psnr": psnr(outputs, targets)}
    if reference is not None:
        kept = classifier.predict(reference.classifier, outputs).argmax(1) == labels
        fd = metrics.evaluate_images(outputs, reference, ["fd"])["fd"]
        scores.update(class_kept=float(kept.mean()), fd=float(fd))
    return scores


Translate = Callable[[np.ndarray], np.ndarray]  # model-range sources -> model-range translations


def torch_translator(generator: nn.Module, device: torch.device | str = "cpu") -> Translate:
    """A torch generator as a numpy function, without gradients."""
    def translate(sources: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return generator(torch.from_numpy(sources).to(device)).cpu().numpy()
    return translate


def translate_all(translate: Translate, sources: np.ndarray, chunk: int = 500) -> np.ndarray:
    """``translate`` over ``sources`` a chunk at a time (bounded memory for thousands of images)."""
    return np.concatenate([translate(sources[i:i + chunk]) for i in range(0, len(sources), chunk)])


def psnr(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean PSNR in dB over images, on pixels in [0, 1] (peak 1)."""
    mse = (((outputs - targets) / 2.0) ** 2).reshape(len(outputs), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def translation_run(config: TrainConfig, force: bool = False) -> RunLoop:
    """A translation run: :class:`TranslationStep` under the run loop, on its paired data."""
    return RunLoop(config, TranslationStep, force=force, batches=translation_batches(config))
