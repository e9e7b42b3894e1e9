"""The one configuration object: built from a preset, a TOML file and CLI overrides, in that order.

It travels unchanged from ``dcgan-train`` into the trainer, the checkpoint and the export manifest.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcgan_core import DEVICES, settings
from dcgan_core.latents import SEED_MAX
from dcgan_core.settings import SettingsError, setting

TOY_DATASETS = ("ring", "grid")
IMAGE_DATASETS = ("mnist", "folder", "synthetic")
TRANSLATION_DATASETS = ("mnist-sr4", "mnist-edges", "paired")  # (source, target) pairs: training/translation.py
DIRECTIONS = ("AtoB", "BtoA")
IMAGE_SIZES = (28, 32, 64)
LR_DECAYS = ("none", "linear")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(SettingsError):
    """A configuration that cannot run; the message names the key and what was expected."""


@dataclass
class DataConfig:
    dataset: str = setting("mnist", "what to learn: MNIST digits, a folder of images, a 2-D toy, or pairs to "
                                    "translate (MNIST block means or edges to digits, a paired folder)",
                           choices=TOY_DATASETS + IMAGE_DATASETS + TRANSLATION_DATASETS)
    path: str = setting("../shared/datasets/mnist", "the data: MNIST's IDX files or the image folder")
    image_size: int = setting(28, "image side in pixels", choices=IMAGE_SIZES)
    channels: int = setting(1, "1 (gray) or 3 (RGB)", choices=(1, 3))
    download: bool = setting(False, "MNIST only: fetch missing files (verified) instead of failing")
    toy_epoch_samples: int = setting(65536, "toy data is sampled fresh; this many samples make an epoch")
    synthetic_samples: int = setting(256, "size of the random dataset used by --dry-run")
    direction: str = setting("AtoB", "paired folders (A | B side by side): translate A to B, or B to A",
                             choices=DIRECTIONS)
    hold_out: list = setting([], "MNIST digits left out of training, e.g. 3 or 3,8: a model that never saw "
                                 "them, for measuring how anomaly scores treat a class they did not learn")


@dataclass
class ModelConfig:
    latent_size: int = setting(100, "size of the latent vector z")
    ngf: int = setting(64, "generator width (channels of its last hidden layer)")
    ndf: int = setting(64, "discriminator width (channels of its first layer)")
    spectral_norm: bool = setting(False, "spectral norm on D's layers (replaces D's BatchNorm)")
    d_extra_layers: int = setting(0, "3x3 stride-1 convs after each of D's strided convs (a deeper D)")
    g_extra_layers: int = setting(0, "3x3 stride-1 convs after each of G's hidden upsampling layers")
    toy_hidden: int = setting(256, "hidden width of the dense toy networks")
    toy_layers: int = setting(3, "hidden layers of the dense toy networks")
    num_classes: int = setting(0, "> 0: class-conditional G and a projection D")
    g_conditioning: str = setting("embed", "conditional G: a label embedding joined to z, or conditional BatchNorm",
                                  choices=("embed", "cbn"))
    class_names: list = setting([], "filled from the data (MNIST digits, sub-folder names)")


@dataclass
class OptimConfig:
    batch_size: int = setting(128, "the global batch (under torchrun divided among the processes)")
    lr_g: float = setting(2e-4, "Adam learning rate of G")
    lr_d: float = setting(2e-4, "Adam learning rate of D")
    beta1: float = setting(0.5, "Adam beta1 of both networks")
    beta2: float = setting(0.999, "Adam beta2 of both networks")
    d_steps: int = setting(1, "discriminator steps (batches) per generator step")
    lr_decay: str = setting("none", "linear: both rates fall linearly to 0 at the last step", choices=LR_DECAYS)


@dataclass
class LossConfig:
    name: str = setting("nonsaturating", "the GAN loss: minimax | nonsaturating | hinge | wgan-gp")
    label_smoothing: float = setting(0.0, "one-sided: real targets become 1 - label_smoothing")
    gp_weight: float = setting(10.0, "wgan-gp only")
    top_k: float = setting(1.0, "G learns from this share of its batch that D rates most real (1: all)")
    l1_weight: float = setting(100.0, "translation: weight of |G(source) - target|_1 beside the GAN loss (pix2pix's "
                                      "lambda)")
    adversarial: bool = setting(True, "translation: false trains G on L1 alone (no discriminator): the baseline")


@dataclass
class RunConfig:
    run_dir: str = setting("runs/mnist", "run directory (resumes if it holds a checkpoint)")
    epochs: int = setting(5, "passes over the data; the schedules are drawn over them")
    max_steps: int = setting(0, "stop after this many discriminator steps in total (0: no limit)")
    seed: int = setting(0, "seed of the whole run (init, batch order, noise)")
    device: str = setting("auto", "where to train (auto: CUDA when there is one)", choices=DEVICES)
    precision: str = setting("auto", "bf16 autocast or fp32; auto: bf16 for image models where it is native",
                             choices=PRECISIONS)
    ema_decay: float = setting(0.999, "0 disables the EMA generator")
    checkpoint_every: int = setting(500, "steps between checkpoints (also at each epoch end)")
    sample_count: int = setting(64, "fixed-noise samples in each epoch's grid")
    progress: bool = setting(True, "a progress bar")
    eval_every: int = setting(0, "epochs between evaluations (toys, 1x28x28 images); the best is kept as best.pt")
    eval_samples: int = setting(2000, "samples per in-training evaluation")
    sync_batchnorm: bool = setting(False, "under torchrun on CUDA: BatchNorm statistics over the global batch")


@dataclass
class EncoderConfig:
    """An encoder stage (f-AnoGAN, training/encoder.py): E learns image -> z for a trained GAN."""

    source: str = setting("", "a trained GAN's run directory: train an encoder for its frozen G and D "
                              "(empty: train a GAN)")
    checkpoint: str = setting("checkpoint.pt", "the source's checkpoint to encode for",
                              choices=("checkpoint.pt", "best.pt"))
    kappa: float = setting(1.0, "weight of D's feature residual beside the pixel residual in the loss and score")
    nef: int = setting(64, "encoder width (channels of its first layer)")
    lr: float = setting(1e-4, "Adam learning rate of the encoder")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    @property
    def kind(self) -> str:
        """``toy2d`` for the dense 2-D GAN, ``translation`` for image-to-image models, ``dcgan`` for
        the other image models."""
        if self.data.dataset in TOY_DATASETS:
            return "toy2d"
        return "translation" if self.data.dataset in TRANSLATION_DATASETS else "dcgan"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        d, m, o, loss, r = self.data, self.model, self.optim, self.loss, self.run
        datasets = TOY_DATASETS + IMAGE_DATASETS + TRANSLATION_DATASETS
        _check(d.dataset in datasets, "data.dataset", d.dataset, f"one of {', '.join(datasets)}")
        _check(d.image_size in IMAGE_SIZES, "data.image_size", d.image_size, f"one of {IMAGE_SIZES}")
        _check(d.channels in (1, 3), "data.channels", d.channels, "1 or 3")
        _check(not (d.dataset.startswith("mnist") and (d.channels, d.image_size) != (1, 28)),
               "data.channels/image_size", (d.channels, d.image_size), "(1, 28) for MNIST")
        _check(d.dataset != "paired" or bool(d.path), "data.path", d.path, "a folder with train/ (and val/, test/)")
        _check(d.direction in DIRECTIONS, "data.direction", d.direction, " or ".join(DIRECTIONS))
        _check(self.kind != "translation" or m.num_classes == 0, "model.num_classes", m.num_classes,
               "0 for translation models (the source image is their condition)")
        _check(loss.l1_weight >= 0 and (loss.adversarial or loss.l1_weight > 0), "loss.l1_weight", loss.l1_weight,
               ">= 0, and > 0 without the adversarial loss")
        _check(d.dataset != "folder" or bool(d.path), "data.path", d.path, "a folder of images")
        _check(not d.hold_out or (d.dataset == "mnist" and not m.num_classes), "data.hold_out", d.hold_out,
               "empty, except for unconditional MNIST models")
        _check(all(type(c) is int and 0 <= c <= 9 for c in d.hold_out) and len(set(d.hold_out)) < 10,
               "data.hold_out", d.hold_out, "some of the digits 0..9, not all")
        for key, value in [("model.latent_size", m.latent_size), ("model.ngf", m.ngf),
                           ("model.ndf", m.ndf), ("model.toy_hidden", m.toy_hidden),
                           ("model.toy_layers", m.toy_layers), ("optim.batch_size", o.batch_size),
                           ("optim.d_steps", o.d_steps), ("run.epochs", r.epochs),
                           ("run.checkpoint_every", r.checkpoint_every),
                           ("run.sample_count", r.sample_count)]:
            _check(value >= 1, key, value, "an integer >= 1")
        _check(o.lr_g > 0 and o.lr_d > 0, "optim.lr_g/lr_d", (o.lr_g, o.lr_d), "positive")
        _check(o.lr_decay in LR_DECAYS, "optim.lr_decay", o.lr_decay, f"one of {', '.join(LR_DECAYS)}")
        _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", (o.beta1, o.beta2), "in [0, 1)")
        from training.losses import LOSSES

        _check(loss.name in LOSSES, "loss.name", loss.name, f"one of {', '.join(LOSSES)}")
        _check(0 < loss.top_k <= 1, "loss.top_k", loss.top_k, "in (0, 1]")
        _check(0 <= loss.label_smoothing < 0.5, "loss.label_smoothing", loss.label_smoothing, "in [0, 0.5)")
        _check(0 <= r.ema_decay < 1, "run.ema_decay", r.ema_decay, "in [0, 1)")
        _check(m.d_extra_layers >= 0 and m.g_extra_layers >= 0, "model.d_extra_layers/g_extra_layers",
               (m.d_extra_layers, m.g_extra_layers), "integers >= 0")
        _check(m.num_classes >= 0, "model.num_classes", m.num_classes, ">= 0 (0: unconditional)")
        _check(m.g_conditioning in ("embed", "cbn"), "model.g_conditioning", m.g_conditioning, "embed or cbn")
        _check(m.num_classes == 0 or self.kind == "dcgan", "model.num_classes", m.num_classes,
               "0 for the 2-D toys (they are unconditional)")
        _check(m.num_classes == 0 or d.dataset != "mnist" or m.num_classes == 10, "model.num_classes",
               m.num_classes, "10 for MNIST (or 0)")
        _check(not m.class_names or len(m.class_names) == m.num_classes, "model.class_names", m.class_names,
               f"{m.num_classes} names, one per class")
        _check(r.max_steps >= 0, "run.max_steps", r.max_steps, ">= 0")
        _check(r.eval_every >= 0, "run.eval_every", r.eval_every, ">= 0")
        _check(r.eval_samples >= 100, "run.eval_samples", r.eval_samples, ">= 100")
        _check(r.eval_every == 0 or self.kind != "dcgan" or (d.channels, d.image_size) == (1, 28),
               "run.eval_every", r.eval_every,
               "0 unless the data is a toy, pairs to translate, or 1x28x28 images (the metrics' MNIST classifier)")
        _check(0 <= r.seed <= SEED_MAX, "run.seed", r.seed, f"an integer in 0..{SEED_MAX}")
        _check(bool(r.run_dir) and not Path(r.run_dir).is_file(), "run.run_dir", r.run_dir,
               "a directory (this names an existing file)")
        _check(r.device in DEVICES, "run.device", r.device, " or ".join(DEVICES))
        _check(r.precision in PRECISIONS, "run.precision", r.precision, ", ".join(PRECISIONS))
        e = self.encoder
        _check(e.kappa >= 0 and e.lr > 0 and e.nef >= 1, "encoder.kappa/lr/nef", (e.kappa, e.lr, e.nef),
               "kappa >= 0, lr > 0, nef >= 1")
        return self


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")


#: Settings that may change when a run resumes; everything else must match the checkpoint.
RESUMABLE_KEYS = frozenset({"data.path", "data.download", "run.run_dir", "run.epochs",
                            "run.max_steps", "run.device", "run.checkpoint_every", "run.progress",
                            "run.eval_every", "run.eval_samples", "run.sync_batchnorm"})

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The recipe of the committed default model: the DCGAN architecture deepened by one 3x3
    # stride-1 conv after each strided layer of G and D (the WGAN authors' "extra layers"), a
    # spectral-norm D (no BatchNorm in D), hinge loss, Adam 8e-4 / (0.5, 0.999) for both nets,
    # batch 32, rates decayed linearly to 0, and an EMA generator. Why each choice, with the
    # figures that decided it (extra layers and batch size at equal wall time, the rates, TTUR's
    # collapse): the MNIST sections of bench/results/TUNING.md. The Lipschitz-bounded D also
    # scores off-distribution inputs (noise) as fake, which a BatchNorm D in eval mode does not:
    # that matters for the Score API.
    "mnist": {
        "data": {"dataset": "mnist", "image_size": 28, "channels": 1},
        "model": {"spectral_norm": True, "d_extra_layers": 1, "g_extra_layers": 1},
        "optim": {"batch_size": 32, "lr_g": 8e-4, "lr_d": 8e-4, "lr_decay": "linear"},
        "loss": {"name": "hinge"},
        "run": {"run_dir": "runs/mnist", "epochs": 25, "ema_decay": 0.999, "checkpoint_every": 1000},
    },
    # The dense GAN on the ring sharpens its modes with training but may later drop one; it is
    # evaluated after every epoch on as many samples as a published version's figures (10k), and
    # best.pt keeps the epoch with every mode and the most high-quality samples (export it with
    # dcgan-export --best). Over 5 seeds: bench/results/preset_ring_eval_10k.json; the recipes
    # tried: bench/results/TUNING.md.
    "ring": {
        "data": {"dataset": "ring"},
        "optim": {"batch_size": 256, "lr_g": 1e-3, "lr_d": 1e-3},
        "run": {"run_dir": "runs/ring", "epochs": 48, "checkpoint_every": 2000, "eval_every": 1,
                "eval_samples": 10000},
    },
    "grid": {
        "data": {"dataset": "grid"},
        "optim": {"batch_size": 256, "lr_g": 1e-3, "lr_d": 1e-3},
        "run": {"run_dir": "runs/grid", "epochs": 8, "checkpoint_every": 1000},
    },
    "folder": {
        "data": {"dataset": "folder", "path": "", "image_size": 64, "channels": 3},
        "run": {"run_dir": "runs/folder", "epochs": 25},
    },
}


# The class-conditional MNIST recipe (issue 16): the mnist preset's networks and optimiser with a
# label embedding joined to z in G and a projection D, 7 epochs with the rates decayed over them.
# The screens behind it (embedding vs conditional BatchNorm, D's extra layers, widths, epochs per
# 30 minutes): bench/results/TUNING.md, from "Class-conditional G" on.
PRESETS["mnist-cond"] = {
    **PRESETS["mnist"],
    "model": {**PRESETS["mnist"]["model"], "num_classes": 10},
    "run": {**PRESETS["mnist"]["run"], "run_dir": "runs/mnist-cond", "epochs": 7},
}

# pix2pix on MNIST (training/translation.py): U-Net G, PatchGAN D with spectral norm, hinge loss,
# Adam 2e-4 / (0.5, 0.999), rates decayed linearly, evaluated (FD, class kept, PSNR on held-out
# test digits) every epoch; best.pt keeps the lowest FD. The L1 weight was measured (3 epochs,
# bench/results/translation.json): super-resolution keeps the most realism at 10 (1 loses the
# digits, 100 blurs them) and gains from 10 epochs; edges -> digit is nearly determined by its
# source, and 100 keeps more classes than 10 there.
_TRANSLATION = {
    "model": {"ngf": 32, "ndf": 32},
    "optim": {"batch_size": 64, "lr_g": 2e-4, "lr_d": 2e-4, "lr_decay": "linear"},
    "run": {"ema_decay": 0.0, "eval_every": 1, "eval_samples": 2000, "checkpoint_every": 1000},
}
for _task, _l1_weight, _epochs in (("mnist-sr4", 10.0, 10), ("mnist-edges", 100.0, 3)):
    PRESETS[_task] = {**_TRANSLATION, "data": {"dataset": _task, "image_size": 28, "channels": 1},
                      "loss": {"name": "hinge", "l1_weight": _l1_weight},
                      "run": {**_TRANSLATION["run"], "run_dir": f"runs/{_task}", "epochs": _epochs}}

# The f-AnoGAN encoder stage for a trained MNIST GAN (name it with --set encoder.source=RUN_DIR):
# the data and networks are the source run's; evaluated every epoch on 2000 test digits.
PRESETS["encoder"] = {
    "encoder": {"source": "runs/mnist"},
    "optim": {"batch_size": 64},
    "run": {"run_dir": "runs/mnist-encoder", "epochs": 5, "eval_every": 1, "checkpoint_every": 1000},
}


def apply(config: TrainConfig, values: dict[str, Any], origin: str) -> None:
    """Set ``{section: {key: value}}`` on ``config``; unknown keys and wrong types are errors."""
    settings.apply(config, values, origin, error=ConfigError)


def parse_override(text: str) -> dict[str, dict[str, str]]:
    """``section.key=value`` as ``{section: {key: value}}``."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optim.lr_g=1e-4")
    return {section: {key: value.strip()}}


def load_config(preset: str | None = None, config_file: Path | None = None,
                overrides: list[dict[str, dict[str, Any]]] = ()) -> TrainConfig:
    """Defaults, then the preset, then the TOML file, then each override; validated."""
    config = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
        apply(config, PRESETS[preset], f"preset {preset}")
    if config_file is not None:
        apply(config, settings.read_toml(config_file, ConfigError), str(config_file))
    for override in overrides:
        apply(config, override, "command line")
    return config.validate()


def from_dict(values: dict[str, dict[str, Any]]) -> TrainConfig:
    """Rebuild a config saved by ``to_dict`` (checkpoints, manifests)."""
    config = TrainConfig()
    apply(config, values, "saved config")
    return config


def differences(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Keys outside RESUMABLE_KEYS whose values differ, as ``key: old -> new`` lines."""
    lines = []
    for section, values in old.to_dict().items():
        for key, value in values.items():
            other = getattr(getattr(new, section), key)
            if f"{section}.{key}" not in RESUMABLE_KEYS and other != value:
                lines.append(f"{section}.{key}: {value!r} -> {other!r}")
    return lines
