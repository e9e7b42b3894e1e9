"""Sampling plans: what a Sample or Walk request produces, validated and fixed before a model runs.

A plan holds the latents and labels of a request (seeded, explicit or truncated, as the .proto
defines them), or for discriminator-guided sampling the seed's candidate stream. Everything here
is a pure function of the manifest, the request and the server's limits; the service runs plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from dcgan_core import latents as latent_rng
from dcgan_core.repository import Manifest
from serving.server.errors import InvalidArgument


@dataclass(frozen=True)
class Limits:
    """The server's bounds on the work of one request (from ServeConfig)."""

    max_count: int = 1024
    max_candidates: int = 8192


@dataclass(frozen=True)
class SampleSpec:
    """What a Sample request asks for, as the .proto documents it (wire types already decoded)."""

    count: int
    seed: int | None = None
    latents: np.ndarray | None = None  # explicit latents instead of a seed
    labels: tuple[int, ...] = ()
    truncation: float | None = None
    min_score: float | None = None  # discriminator-guided sampling: a threshold, or
    keep_top: float | None = None  # the share of candidates to keep
    include_scores: bool = False
    model: str = ""  # "": the repository's default model
    version: int = 0  # 0: the latest ready version
    encoding: str = "auto"  # serving.wire.ENCODINGS

    @property
    def guided(self) -> bool:
        return self.min_score is not None or self.keep_top is not None


@dataclass(frozen=True)
class SamplePlan:
    """A validated sample request: its latents and labels, or for guided sampling its candidate
    stream (the latents exist only once the discriminator has chosen them)."""

    spec: SampleSpec
    count: int
    seed: int
    latents: np.ndarray | None
    labels: np.ndarray | None
    stream: latent_rng.LatentStream | None = None  # guided sampling only
    label: int | None = None  # guided sampling: the one class of every candidate, if sent


@dataclass(frozen=True)
class Endpoint:
    """One end of a latent walk: sample ``index`` of ``seed``, or an explicit latent."""

    seed: int | None = None
    index: int = 0
    latent: np.ndarray | None = None
    label: int | None = None


@dataclass(frozen=True)
class WalkSpec:
    """What a Walk request asks for."""

    start: Endpoint
    end: Endpoint
    steps: int
    method: str = "slerp"  # dcgan_core.latents.INTERPOLATIONS
    truncation: float | None = None
    include_scores: bool = False
    model: str = ""
    version: int = 0
    encoding: str = "auto"


def keep_top_share(keep_top: float) -> Fraction:
    """keep_top as the .proto defines it: the shortest decimal that rounds to the float32 the client
    sent (0.7f is 0.699999988...: it reads 0.7, so 7 samples take 10 candidates, not 11), exact.

    Exact, not rounded to a few decimals: a rounded share may become 0 (1e-7) or shift
    ceil(count / keep_top) by one; numpy prints a float32 as exactly this shortest decimal.
    """
    return Fraction(str(np.float32(keep_top)))


def plan(manifest: Manifest, spec: SampleSpec, limits: Limits) -> SamplePlan:
    """Validate a sample request and fix what it produces: latents, labels and seed."""
    _check_controls(spec)
    if spec.latents is not None:
        z = check_latents(manifest, spec.latents, "latents")
        if spec.count not in (0, len(z)):
            raise InvalidArgument(f"count is {spec.count} but latents have {len(z)} rows")
        if spec.seed is not None:
            raise InvalidArgument("give either seed or latents, not both")
        check_count(len(z), limits)
        return SamplePlan(spec, len(z), 0, z, labels_for(manifest, len(z), spec.labels))
    check_count(spec.count, limits)
    seed = latent_rng.draw_seed() if spec.seed is None else spec.seed
    try:
        stream = latent_rng.LatentStream(seed, manifest.latent_size, manifest.num_classes, spec.truncation)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    if spec.guided:
        return SamplePlan(spec, spec.count, seed, None, None, stream, _guided_label(manifest, spec.labels))
    z, drawn = stream.take(spec.count)
    return SamplePlan(spec, spec.count, seed, z, labels_for(manifest, spec.count, spec.labels, drawn))


def _check_truncation(truncation: float | None) -> None:
    if truncation is not None:
        try:
            latent_rng.check_truncation(truncation)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc


def _check_controls(spec: SampleSpec) -> None:
    _check_truncation(spec.truncation)
    if spec.min_score is not None and spec.keep_top is not None:
        raise InvalidArgument("give min_score or keep_top, not both")
    for name, value in (("min_score", spec.min_score), ("keep_top", spec.keep_top)):
        if value is not None and not 0 < value < 1:  # NaN fails too
            raise InvalidArgument(f"{name} = {value} is out of range: use a value in (0, 1), exclusive")
    if spec.latents is not None and (spec.truncation is not None or spec.guided):
        raise InvalidArgument("truncation and discriminator-guided sampling draw their latents from a "
                              "seed: send a seed (or none), not latents")


def check_latents(manifest: Manifest, explicit: np.ndarray, what: str) -> np.ndarray:
    """Explicit latents [N, latent_size] as float32, every entry finite and within bounds."""
    size = manifest.latent_size
    if explicit.ndim != 2 or explicit.shape[1] != size:
        raise InvalidArgument(f"{what} have shape {list(explicit.shape)}; model {manifest.name!r} "
                              f"expects [count, {size}]")
    outside = ~(np.abs(explicit) <= latent_rng.MAX_ABS_LATENT)  # NaN compares False: caught too
    if outside.any():
        row, column = (int(i) for i in np.argwhere(outside)[0])
        raise InvalidArgument(f"{what}[{row}, {column}] = {float(explicit[row, column])}: entries must "
                              f"be finite (no NaN or infinite values) with |z| <= "
                              f"{latent_rng.MAX_ABS_LATENT:g}")
    return explicit.astype(np.float32, copy=False)


def labels_for(manifest: Manifest, count: int, requested: tuple[int, ...] | list[int],
               drawn: np.ndarray | None = None) -> np.ndarray | None:
    """The classes of a request: as sent (``count`` values, or one for all), else ``drawn``
    (a seeded request's, dcgan_core.latents); None for an unconditional model."""
    classes, name = manifest.num_classes, manifest.name
    if not classes:
        if requested:
            raise InvalidArgument(f"model {name!r} is not class-conditional: send no labels")
        return None
    if not requested:
        if drawn is None:
            raise InvalidArgument(f"model {name!r} is class-conditional: explicit latents need labels "
                                  f"(0..{classes - 1}), one per row or one for all")
        return drawn
    if len(requested) not in (1, count):
        raise InvalidArgument(f"labels has {len(requested)} values; model {name!r} needs {count} (one per "
                              f"sample) or 1 (for all)")
    values = np.asarray(requested, dtype=np.int64)
    outside = (values < 0) | (values >= classes)
    if outside.any():
        index = int(np.argmax(outside))
        raise InvalidArgument(f"labels[{index}] = {int(values[index])} is out of range for model {name!r}: "
                              f"classes are 0..{classes - 1}")
    return np.full(count, values[0]) if len(values) == 1 else values


def _guided_label(manifest: Manifest, requested: tuple[int, ...]) -> int | None:
    if len(requested) > 1:
        raise InvalidArgument(f"discriminator-guided sampling takes one label for every sample (or none), "
                              f"got {len(requested)}")
    return int(labels_for(manifest, 1, requested)[0]) if requested else None


def check_count(count: int, limits: Limits) -> None:
    if not 1 <= count <= limits.max_count:
        raise InvalidArgument(f"count must be in 1..{limits.max_count}, got {count}")


def chunks(count: int, chunk_size: int, default: int) -> list[tuple[int, int]]:
    """(offset, size) of each SampleStream message (``chunk_size`` 0: ``default``)."""
    size = chunk_size or default
    if size < 0:
        raise InvalidArgument(f"chunk_size must be >= 0, got {chunk_size}")
    return [(start, min(size, count - start)) for start in range(0, count, size)]


def candidates_for(count: int, keep_top: float) -> int:
    """The candidates keep_top draws for ``count`` samples: ceil(count / keep_top), exactly."""
    return math.ceil(count / keep_top_share(keep_top))


# ---------------------------------------------------------------------------- walks


def walk_latents(manifest: Manifest, walk: WalkSpec, limits: Limits) -> tuple[np.ndarray, np.ndarray | None]:
    """The latents (and labels) of a walk's frames."""
    if not 2 <= walk.steps <= limits.max_count:
        raise InvalidArgument(f"steps = {walk.steps} is out of range: a walk has 2..{limits.max_count} frames")
    _check_truncation(walk.truncation)
    (a, label_a), (b, label_b) = (_endpoint(manifest, point, walk.truncation, name, limits)
                                  for point, name in ((walk.start, "start"), (walk.end, "end")))
    if label_a != label_b:
        raise InvalidArgument(f"the ends of the walk have classes {label_a} and {label_b}: walks between "
                              f"classes are not supported, give both ends the same label")
    try:
        path = latent_rng.interpolate(a, b, walk.steps, walk.method)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    return path, None if label_a is None else np.full(walk.steps, label_a, dtype=np.int64)


def _endpoint(manifest: Manifest, point: Endpoint, truncation: float | None, name: str,
              limits: Limits) -> tuple[np.ndarray, int | None]:
    requested = () if point.label is None else (point.label,)
    if point.latent is not None:
        if len(point.latent) != manifest.latent_size:
            raise InvalidArgument(f"{name}.latent has {len(point.latent)} entries; model {manifest.name!r} "
                                  f"has latent size {manifest.latent_size}")
        z = check_latents(manifest, point.latent.reshape(1, -1), f"{name}.latent")[0]
        labels = labels_for(manifest, 1, requested)
    elif point.seed is None:
        raise InvalidArgument(f"{name}: give a seeded point or an explicit latent")
    else:
        if not 0 <= point.index < limits.max_count:
            raise InvalidArgument(f"{name}.seeded.index = {point.index} is out of range: "
                                  f"0..{limits.max_count - 1}")
        try:
            stream = latent_rng.LatentStream(point.seed, manifest.latent_size, manifest.num_classes, truncation)
        except ValueError as exc:
            raise InvalidArgument(f"{name}: {exc}") from exc
        z, drawn = stream.row(point.index)
        labels = labels_for(manifest, 1, requested, None if drawn is None else np.array([drawn]))
    return z, None if labels is None else int(labels[0])
