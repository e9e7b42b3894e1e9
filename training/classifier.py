"""A small MNIST classifier whose penultimate features stand in for Inception features offline.

Trained once with a fixed seed and cached under a cache directory keyed by the dataset's content
checksum, so every evaluation on the same data uses the same feature extractor.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dcgan_core import images
from dcgan_core.atomic import atomic_write
from training.data import MNIST_CONTENT_SHA256, load_mnist

log = logging.getLogger(__name__)
FEATURES = 128
MIN_ACCURACY = 0.985


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCGAN_CACHE", Path.home() / ".cache" / "dcgan"))


class MnistClassifier(nn.Module):
    """LeNet-style CNN: 28x28 model-range images -> 10 logits; ``features`` gives the 128-d layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32 * 7 * 7, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _dataset_key() -> str:
    joined = "".join(MNIST_CONTENT_SHA256[k] for k in sorted(MNIST_CONTENT_SHA256))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def train_classifier(mnist_dir: Path, epochs: int = 3, seed: int = 0, progress: bool = True,
                     max_steps: int | None = None) -> MnistClassifier:
    """Adam 1e-3, batch 128; ``max_steps`` cuts training short (tests only)."""
    torch.manual_seed(seed)
    pixels, labels = load_mnist(mnist_dir, "train")
    x = torch.from_numpy(images.uint8_to_model(pixels))
    y = torch.from_numpy(labels.astype(np.int64))
    model = MnistClassifier()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        starts = range(0, len(x), 128)[:max_steps]
        for start in tqdm(starts, desc=f"classifier epoch {epoch + 1}/{epochs}", disable=not progress):
            rows = order[start : start + 128]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: MnistClassifier, mnist_dir: Path) -> float:
    pixels, labels = load_mnist(mnist_dir, "test")
    predictions = predict(model, images.uint8_to_model(pixels)).argmax(1)
    return float((predictions == labels).mean())


@torch.no_grad()
def predict(model: MnistClassifier, samples: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class probabilities for model-range samples."""
    return np.concatenate([F.softmax(model(torch.from_numpy(samples[i : i + batch])), 1).numpy()
                           for i in range(0, len(samples), batch)])


@torch.no_grad()
def features(model: MnistClassifier, samples: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([model.features(torch.from_numpy(samples[i : i + batch])).numpy().astype(np.float64)
                           for i in range(0, len(samples), batch)])


def classifier_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"mnist-classifier-v3-{_dataset_key()}.pt"


def load_classifier(mnist_dir: Path, cache_dir: Path | None = None, progress: bool = True) -> MnistClassifier:
    """The cached classifier for this dataset, training (and checking accuracy) on first use."""
    path = classifier_path(cache_dir)
    model = MnistClassifier()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    log.info("training the evaluation classifier once (cached at %s)", path)
    model = train_classifier(mnist_dir, progress=progress)
    acc = accuracy(model, mnist_dir)
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"evaluation classifier reached only {acc:.4f} test accuracy (< {MIN_ACCURACY})")
    log.info("evaluation classifier test accuracy %.4f", acc)
    atomic_write(path, lambda handle: torch.save(model.state_dict(), handle))
    return model
