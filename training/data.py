"""Training data: MNIST IDX files, folders of images, 2-D toy mixtures, synthetic dry-run data.

Image data leaves this module already in the project's image convention (dcgan_core.images):
float32 NCHW in [-1, 1]. Batches are a pure function of (seed, epoch, index), which is what makes
a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dcgan_core import images
from dcgan_core.atomic import atomic_write_bytes
from dcgan_core.images import IMAGE_SUFFIXES
from training.config import TrainConfig

log = logging.getLogger(__name__)

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
#: sha256 of the decompressed IDX content: the same whatever gzip settings a mirror used.
MNIST_CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
IDX_DTYPES = {0x08: np.uint8}


class DataError(RuntimeError):
    """Missing, corrupt or unusable training data; the message names the file."""


# --------------------------------------------------------------------------- MNIST / IDX


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse IDX bytes (magic, dims, data) into an array; any inconsistency names ``name``."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{name}: unsupported IDX type 0x{dtype:02x} with {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise DataError(f"{name}: IDX header says {shape} ({expected} bytes) but file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=IDX_DTYPES[dtype], offset=header).reshape(shape)


def _read_checksum_list(directory: Path) -> dict[str, str]:
    sums = directory / "SHA256SUMS"
    if not sums.exists():
        return {}
    entries = (line.split() for line in sums.read_text().splitlines() if line.strip())
    return {parts[-1].lstrip("*"): parts[0] for parts in entries if len(parts) >= 2}


def read_mnist_file(directory: Path, stem: str) -> np.ndarray:
    """Read ``stem`` (.gz or plain) from ``directory``, verified by checksum list and content hash."""
    candidates = [directory / f"{stem}.gz", directory / stem]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise DataError(f"MNIST file {stem}.gz is missing from {directory} "
                        f"(use --set data.download=true to fetch it, or point data.path elsewhere)")
    blob = path.read_bytes()
    listed = _read_checksum_list(directory).get(path.name)
    if listed is not None and hashlib.sha256(blob).hexdigest() != listed:
        raise DataError(f"{path}: sha256 does not match {directory / 'SHA256SUMS'} (corrupt file)")
    try:
        raw = gzip.decompress(blob) if path.suffix == ".gz" else blob
    except (OSError, EOFError, zlib.error) as exc:  # a flipped byte may surface as any of these
        raise DataError(f"{path}: cannot decompress, the file is corrupt ({exc})") from None
    if hashlib.sha256(raw).hexdigest() != MNIST_CONTENT_SHA256[stem]:
        raise DataError(f"{path}: content sha256 is not the standard MNIST {stem} (corrupt file)")
    return parse_idx(raw, str(path))


def download_mnist(directory: Path) -> None:
    """Fetch missing MNIST files from a public mirror, verifying each before it is kept."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem in MNIST_FILES.values():
        target = directory / f"{stem}.gz"
        if target.exists():
            continue
        log.info("downloading %s", MNIST_MIRROR + target.name)
        with urllib.request.urlopen(MNIST_MIRROR + target.name, timeout=60) as response:
            blob = response.read()
        if hashlib.sha256(gzip.decompress(blob)).hexdigest() != MNIST_CONTENT_SHA256[stem]:
            raise DataError(f"downloaded {target.name} failed verification; nothing was saved")
        atomic_write_bytes(target, blob)


def load_mnist(directory: Path, split: str = "train", download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` as (uint8 N x 1 x 28 x 28 images, uint8 N labels)."""
    if download:
        download_mnist(directory)
    pixels = read_mnist_file(directory, MNIST_FILES[(split, "images")])
    labels = read_mnist_file(directory, MNIST_FILES[(split, "labels")])
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28) or labels.shape != (pixels.shape[0],):
        raise DataError(f"{directory}: MNIST {split} has images {pixels.shape} and labels {labels.shape}")
    return pixels[:, None].copy(), labels.copy()


# --------------------------------------------------------------------------- image folders


def load_image_folder(directory: Path, size: int, channels: int, progress: bool = True) -> np.ndarray:
    """Every readable image below ``directory``, centre-cropped and resized, as uint8 NCHW.

    Unreadable files are logged and skipped; a folder with no usable image is an error.
    """
    if not directory.is_dir():
        raise DataError(f"image folder {directory} does not exist")
    return _decode_all(image_paths(directory), size, channels, progress, directory)[0]


def load_labelled_folder(directory: Path, size: int, channels: int,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, class names) of a folder with one sub-folder per class; the class names
    are the sorted sub-folder names, and a class is the index of its name."""
    if not directory.is_dir():
        raise DataError(f"image folder {directory} does not exist")
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"image folder {directory} has no class sub-folders; model.num_classes > 0 needs "
                        f"one sub-folder per class (or set model.num_classes = 0)")
    paths = [(path, label) for label, name in enumerate(names) for path in image_paths(directory / name)]
    pixels, kept = _decode_all([p for p, _ in paths], size, channels, progress, directory)
    labels = np.array([paths[i][1] for i in kept], dtype=np.int64)
    return pixels, labels, names


def image_paths(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _decode_all(paths: list[Path], size: int, channels: int, progress: bool,
                directory: Path) -> tuple[np.ndarray, list[int]]:
    """The readable images of ``paths`` as uint8 NCHW and the indices of those that were read."""
    loaded, kept = [], []
    for index, path in enumerate(tqdm(paths, desc="decoding images", unit="img", disable=not progress)):
        try:
            with Image.open(path) as img:
                img = images.to_8bit(img, channels)
                loaded.append(images.pil_to_chw(images.center_crop_resize(img, size)))
                kept.append(index)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
    if len(kept) < len(paths):
        log.warning("skipped %d of %d files in %s", len(paths) - len(kept), len(paths), directory)
    if not loaded:
        raise DataError(f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return np.stack(loaded), kept


# --------------------------------------------------------------------------- 2-D toys


@dataclass(frozen=True)
class ToyMixture:
    """An equal-weight mixture of isotropic Gaussians in 2-D (the PacGAN/VEEGAN benchmarks)."""

    means: np.ndarray  # (modes, 2)
    sigma: float

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        means = torch.from_numpy(self.means).float()
        modes = torch.randint(len(means), (count,), generator=generator)
        return means[modes] + self.sigma * torch.randn(count, 2, generator=generator)


def toy_mixture(name: str) -> ToyMixture:
    """``ring``: 8 modes on the unit circle, sigma 0.01; ``grid``: 5x5 at {-4,-2,0,2,4}, sigma 0.05."""
    if name == "ring":
        angles = 2 * np.pi * np.arange(8) / 8
        return ToyMixture(np.stack([np.cos(angles), np.sin(angles)], 1), 0.01)
    if name == "grid":
        axis = np.arange(-4, 5, 2, dtype=np.float64)
        return ToyMixture(np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2), 0.05)
    raise DataError(f"unknown toy distribution {name!r}; expected ring or grid")


# --------------------------------------------------------------------------- batches


def derive_seed(*numbers: int) -> int:
    """A deterministic seed derived from several integers."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0] >> 1)


class ImageBatches:
    """Shuffled batches of an in-memory dataset; each epoch's order depends on (seed, epoch) only.

    With ``labels`` ``labels(epoch, index)`` gives the condition of the same rows as ``batch(epoch,
    index)``: their classes (class-conditional training), or their source images (translation).
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, labels: torch.Tensor | None = None,
                 class_names: list[str] | None = None):
        if len(data) < batch_size:
            raise DataError(f"dataset has {len(data)} images, fewer than one batch of {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.class_labels, self.class_names = labels, list(class_names or [])
        self.steps_per_epoch = len(data) // batch_size  # the last partial batch is dropped
        self._order: tuple[int, torch.Tensor] | None = None

    def _rows(self, epoch: int, index: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._order = (epoch, torch.randperm(len(self.data), generator=gen))
        return self._order[1][index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        return self.data[self._rows(epoch, index)]

    def labels(self, epoch: int, index: int) -> torch.Tensor:
        return self.class_labels[self._rows(epoch, index)]

    @property
    def conditioned(self) -> bool:
        """Whether each row carries a condition: its class, or (translation) its source image."""
        return self.class_labels is not None

    def class_frequencies(self) -> torch.Tensor:
        """Share of each class in the data: fake labels are drawn with these weights."""
        counts = torch.bincount(self.class_labels, minlength=len(self.class_names)).double()
        return counts / counts.sum()


class ToyBatches:
    """Fresh samples of a toy mixture; batch (epoch, index) is the same on every run."""

    def __init__(self, mixture: ToyMixture, batch_size: int, epoch_samples: int, seed: int):
        self.mixture, self.batch_size, self.seed = mixture, batch_size, seed
        self.steps_per_epoch = max(1, epoch_samples // batch_size)
        self.conditioned = False

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        return self.mixture.sample(self.batch_size, gen)


def synthetic_images(count: int, channels: int, size: int, seed: int) -> np.ndarray:
    """Random uint8 images for --dry-run: no files needed, shapes as real data."""
    return np.random.default_rng(seed).integers(0, 256, (count, channels, size, size), dtype=np.uint8)


def build_batches(config: TrainConfig) -> ImageBatches | ToyBatches:
    """The batch source a config asks for (with labels when the model is class-conditional)."""
    d, batch_size, seed = config.data, config.optim.batch_size, config.run.seed
    if config.kind == "toy2d":
        return ToyBatches(toy_mixture(d.dataset), batch_size, d.toy_epoch_samples, seed)
    classes = config.model.num_classes
    labels, names = None, [str(c) for c in range(classes)]
    if d.dataset == "mnist":
        pixels, labels = load_mnist(Path(d.path), "train", d.download)  # classes "0".."9": the default names
        kept = ~np.isin(labels, d.hold_out)
        pixels, labels = pixels[kept], labels[kept]
    elif d.dataset == "folder" and classes:
        pixels, labels, names = load_labelled_folder(Path(d.path), d.image_size, d.channels, config.run.progress)
    elif d.dataset == "folder":
        pixels = load_image_folder(Path(d.path), d.image_size, d.channels, config.run.progress)
    else:
        pixels = synthetic_images(d.synthetic_samples, d.channels, d.image_size, seed)
        labels = np.random.default_rng(seed).integers(0, max(classes, 1), len(pixels))
    if classes and len(names) != classes:
        raise DataError(f"{d.path} has {len(names)} classes ({', '.join(names)}), model.num_classes is {classes}")
    data = torch.from_numpy(images.uint8_to_model(pixels))
    if not classes:
        return ImageBatches(data, batch_size, seed)
    return ImageBatches(data, batch_size, seed, torch.from_numpy(labels.astype(np.int64)), names)
