"""Seeded latent vectors and the paths between them: the algorithms training, serving and every
client share.

``latents(seed, count, size)`` is ``numpy.random.default_rng(seed).standard_normal((count, size),
dtype=float32)`` (PCG64, Ziggurat normals). The proto documents exactly this, so any client with
numpy reproduces the latents of a seeded ``Sample`` call without asking the server. A seed's
latents, labels and truncation redraws are three separate streams (``default_rng(seed)``,
``default_rng([seed, 1])``, ``default_rng([seed, 2])``); each is read front to back, so the first
rows of a seed are the same whether they are drawn at once or in pieces (``LatentStream``).
"""

from __future__ import annotations

import numpy as np

SEED_MAX = 2**63 - 1
#: Largest |z| accepted in explicit latents. Standard normals never come near it (P(|z| > 6) is
#: 2e-9); beyond it float32 layers overflow and a generator returns NaN instead of an image.
MAX_ABS_LATENT = 1000.0
#: Smallest truncation threshold: below it nearly every entry is redrawn many times over
#: (P(|z| <= 0.1) = 8%), so the work per sample grows without bound while the samples barely change.
MIN_TRUNCATION = 0.1
INTERPOLATIONS = ("slerp", "lerp")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2^63-1], got {seed}")


def check_truncation(truncation: float) -> None:
    if not truncation >= MIN_TRUNCATION:  # NaN fails too
        raise ValueError(f"truncation = {truncation} is out of range: use a threshold >= {MIN_TRUNCATION} "
                         f"(latent entries with |z| above it are redrawn)")


class LatentStream:
    """The sample sequence of a seed: row i's latent (and label) are the same however the rows
    are drawn, in one call or in rounds (discriminator-guided sampling draws candidates in rounds).

    With ``truncation`` t (BigGAN's truncation trick), each row in turn has every entry with
    |z| > t replaced by the next normals of the redraw stream ``default_rng([seed, 2])``, in
    index order, until no entry of the row exceeds t.
    """

    def __init__(self, seed: int, size: int, classes: int = 0, truncation: float | None = None):
        _check_seed(seed)
        if truncation is not None:
            check_truncation(truncation)
        self.size, self.classes, self.truncation = size, classes, truncation
        self._latents = np.random.default_rng(seed)
        self._labels = np.random.default_rng([seed, 1])
        self._redraws = np.random.default_rng([seed, 2])
        self.drawn = 0

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The next ``count`` latents (float32 [count, size]) and, for ``classes`` > 0, labels."""
        z = self._latents.standard_normal((count, self.size), dtype=np.float32)
        if self.truncation is not None:
            for row in z:
                while (outside := np.abs(row) > self.truncation).any():
                    row[outside] = self._redraws.standard_normal(int(outside.sum()), dtype=np.float32)
        labels = self._labels.integers(0, self.classes, count, dtype=np.int64) if self.classes else None
        self.drawn += count
        return z, labels

    def row(self, index: int) -> tuple[np.ndarray, int | None]:
        """Sample ``index``'s latent and label (a fresh stream: draws rows 0..index)."""
        z, labels = self.take(index + 1)
        return z[index], None if labels is None else int(labels[index])


def latents(seed: int, count: int, size: int) -> np.ndarray:
    """``count`` latent vectors of ``size`` float32 standard normals, determined by ``seed``."""
    return LatentStream(seed, size).take(count)[0]


def draw_seed() -> int:
    """A fresh random seed for requests that did not bring one (returned to the caller)."""
    return int(np.random.default_rng().integers(0, SEED_MAX, dtype=np.int64))


def interpolate(start: np.ndarray, end: np.ndarray, steps: int, method: str = "slerp") -> np.ndarray:
    """``steps`` float32 points from ``start`` to ``end`` (both included), at t = k / (steps - 1).

    slerp (the default, right for Gaussian latents, whose mass lies near a sphere: a straight line
    passes through low-norm latents the generator rarely saw) is
    sin((1-t)w)/sin(w) * start + sin(t w)/sin(w) * end, with w the angle between them, computed in
    float64; when sin(w) < 1e-6 (parallel or opposite points) it falls back to lerp,
    (1-t) * start + t * end. Both give the endpoints exactly.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"interpolation {method!r}: expected {' or '.join(INTERPOLATIONS)}")
    if steps < 2:
        raise ValueError(f"steps = {steps} is out of range: a walk has at least 2 frames")
    a, b = np.asarray(start, np.float64), np.asarray(end, np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    omega = np.arccos(np.clip(a @ b / norms, -1.0, 1.0)) if norms > 0 else 0.0
    if method == "lerp" or np.sin(omega) < 1e-6:
        path = (1.0 - t) * a + t * b
    else:
        path = (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    path[0], path[-1] = a, b  # exact endpoints whatever the rounding above
    return path.astype(np.float32)
