"""Seeded latent vectors: the one algorithm that training, serving and every client share.

``latents(seed, count, size)`` is ``numpy.random.default_rng(seed).standard_normal((count, size),
dtype=float32)`` (PCG64, Ziggurat normals). The proto documents exactly this, so any client with
numpy reproduces the latents of a seeded ``Sample`` call without asking the server.
"""

from __future__ import annotations

import numpy as np

SEED_MAX = 2**63 - 1
#: Largest |z| accepted in explicit latents. Standard normals never come near it (P(|z| > 6) is
#: 2e-9); beyond it float32 layers overflow and a generator returns NaN instead of an image.
MAX_ABS_LATENT = 1000.0


def latents(seed: int, count: int, size: int) -> np.ndarray:
    """``count`` latent vectors of ``size`` float32 standard normals, determined by ``seed``."""
    _check_seed(seed)
    return np.random.default_rng(seed).standard_normal((count, size), dtype=np.float32)


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2^63-1], got {seed}")


def draw_seed() -> int:
    """A fresh random seed for requests that did not bring one (returned to the caller)."""
    return int(np.random.default_rng().integers(0, SEED_MAX, dtype=np.int64))


def labels(seed: int, count: int, classes: int) -> np.ndarray:
    """The classes a seeded request of a class-conditional model gets when it names none:
    ``numpy.random.default_rng([seed, 1]).integers(0, classes, count)`` (int64), a stream apart
    from the latents', so the latents of a seed do not depend on whether labels were drawn."""
    _check_seed(seed)
    return np.random.default_rng([seed, 1]).integers(0, classes, count, dtype=np.int64)
