"""Offline quality metrics with a registry, usable from code and from ``dcgan-eval``.

Image metrics use the project's MNIST classifier (training.classifier) in place of Inception:
  fd        Fréchet distance between classifier features of samples and of the MNIST test set
  is        classifier Inception Score, exp E[KL(p(y|x) || p(y))], at most 10
  coverage  share of samples per predicted digit (min and max)
  consistency  (class-conditional samples) share the classifier assigns to the requested class,
            overall, per class and its minimum
Toy metrics (PacGAN definitions) for 2-D mixtures:
  toy       modes covered, share of high-quality samples, reverse KL of the mode histogram
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcgan_core import images
from training.data import ToyMixture, load_mnist


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2), via symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)  # same spectrum as C_a C_b
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def inception_score(probabilities: np.ndarray) -> float:
    marginal = probabilities.mean(0, keepdims=True)
    kl = (probabilities * (np.log(probabilities + 1e-12) - np.log(marginal + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


def class_coverage(probabilities: np.ndarray, classes: int = 10) -> dict[str, float]:
    share = np.bincount(probabilities.argmax(1), minlength=classes) / len(probabilities)
    return {"min": float(share.min()), "max": float(share.max()), "per_class": share.round(4).tolist()}


def toy_metrics(points: np.ndarray, mixture: ToyMixture) -> dict[str, float]:
    """PacGAN: a mode is covered when a sample lies within 3 sigma of it; high quality = within 3
    sigma of its nearest mode; reverse KL(histogram of high-quality samples || uniform)."""
    distances = np.linalg.norm(points[:, None, :] - mixture.means[None], axis=2)
    nearest, gap = distances.argmin(1), distances.min(1)
    good = gap <= 3 * mixture.sigma
    modes = len(mixture.means)
    counts = np.bincount(nearest[good], minlength=modes)
    histogram = counts / max(1, counts.sum())
    present = histogram > 0
    reverse_kl = float((histogram[present] * np.log(histogram[present] * modes)).sum()) if good.any() else float("inf")
    return {"modes_covered": int((counts > 0).sum()), "modes": modes,
            "high_quality": float(good.mean()), "reverse_kl": reverse_kl}


@dataclass
class ImageReference:
    """Classifier + test-set statistics: computed once, shared by every image metric."""

    classifier: object
    test_features: np.ndarray
    train_samples: np.ndarray  # model range, for the real-vs-real floor
    test_labels: np.ndarray | None = None  # for per-class FD
    train_labels: np.ndarray | None = None  # for the floor of the class-conditional metrics

    @classmethod
    def load(cls, mnist_dir: Path, cache_dir: Path | None = None, progress: bool = True,
             floor_samples: int = 10000) -> "ImageReference":
        from training import classifier as clf

        model = clf.load_classifier(mnist_dir, cache_dir, progress)
        test, test_labels = load_mnist(mnist_dir, "test")
        train, train_labels = load_mnist(mnist_dir, "train")
        return cls(model, clf.features(model, images.uint8_to_model(test)),
                   images.uint8_to_model(train[:floor_samples]), test_labels.astype(np.int64),
                   train_labels[:floor_samples].astype(np.int64))


#: (model-range samples, reference, requested classes or None) -> {metric: value}
ImageMetric = Callable[[np.ndarray, ImageReference, np.ndarray | None], dict]


def class_consistency(probabilities: np.ndarray, labels: np.ndarray, classes: int = 10) -> dict:
    """Share of samples whose predicted class is the one they were generated for."""
    hits = probabilities.argmax(1) == labels
    per_class = [float(hits[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(classes)]
    return {"consistency": float(hits.mean()), "consistency_min": float(np.nanmin(per_class)),
            "consistency_per_class": [round(v, 4) for v in per_class]}


def _consistency(samples: np.ndarray, ref: ImageReference, labels: np.ndarray | None) -> dict:
    from training.classifier import predict

    return {} if labels is None else class_consistency(predict(ref.classifier, samples), labels)


def _fd(samples: np.ndarray, ref: ImageReference, labels: np.ndarray | None = None) -> dict:
    """FD overall; with labels also per class, against the test images of that class."""
    from training.classifier import features

    feats = features(ref.classifier, samples)
    result = {"fd": frechet_distance(feats, ref.test_features)}
    if labels is not None and ref.test_labels is not None:
        per_class = [frechet_distance(feats[labels == c], ref.test_features[ref.test_labels == c])
                     for c in range(10) if (labels == c).sum() > 1]
        result.update(fd_class_max=float(max(per_class)), fd_per_class=[round(v, 3) for v in per_class])
    return result


def _is(samples: np.ndarray, ref: ImageReference, labels: np.ndarray | None = None) -> dict:
    from training.classifier import predict

    return {"is": inception_score(predict(ref.classifier, samples))}


def _coverage(samples: np.ndarray, ref: ImageReference, labels: np.ndarray | None = None) -> dict:
    from training.classifier import predict

    coverage = class_coverage(predict(ref.classifier, samples))
    return {"coverage_min": coverage["min"], "coverage_max": coverage["max"],
            "coverage_per_class": coverage["per_class"]}


IMAGE_METRICS: dict[str, ImageMetric] = {"fd": _fd, "is": _is, "coverage": _coverage,
                                          "consistency": _consistency}


def evaluate_images(samples: np.ndarray, ref: ImageReference, names: list[str] | None = None,
                    labels: np.ndarray | None = None) -> dict:
    """Every requested image metric of model-range NCHW samples (``labels``: the classes they were
    generated for, which the class-conditional metrics need; the others ignore them)."""
    result: dict = {"samples": int(len(samples))}
    for name in names or list(IMAGE_METRICS):
        result.update(IMAGE_METRICS[name](samples, ref, labels))
    return result


def real_floor(ref: ImageReference, names: list[str] | None = None) -> dict:
    """The same metrics for real training images against the test set: the best a model can do."""
    return evaluate_images(ref.train_samples, ref, names, ref.train_labels)
