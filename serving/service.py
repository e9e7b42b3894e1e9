"""The inference service's domain logic, free of gRPC: validate, batch, run, return numpy.

Inputs and outputs are model-range float32 arrays (dcgan_core.images); the servicer converts
to and from the wire encodings. ``sample`` and ``score`` are coroutines: a call waits for its
batch without holding a thread, so one event loop serves every connection (threads cost a GIL
hand-off per call, which dominated the cost of small requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from dcgan_core import latents as latent_rng
from dcgan_core.repository import Manifest
from serving.batcher import DynamicBatcher, Expired, Inputs, QueueFull, Stopped
from serving.config import ServeConfig
from serving.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from serving.store import LoadedVersion, ModelStore

IMAGE_RANGE_SLACK = 1e-3  # float32 images may exceed [-1, 1] by rounding, not more


@dataclass(frozen=True)
class Call:
    """Per-call context: absolute deadline (time.monotonic) and whether the caller is still there."""

    deadline: float | None = None
    is_active: Callable[[], bool] = lambda: True

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class SampleResult:
    manifest: Manifest
    provider: str
    seed: int
    samples: np.ndarray  # float32, model range
    logits: np.ndarray | None
    labels: np.ndarray | None = None  # class-conditional models: the class of each sample


@dataclass
class ScoreResult:
    manifest: Manifest
    provider: str
    logits: np.ndarray
    labels: np.ndarray | None = None  # class-conditional models: the class each image was scored under

    @property
    def probabilities(self) -> np.ndarray:
        return probabilities(self.logits)


def _with(inputs: np.ndarray, labels: np.ndarray | None) -> Inputs:
    """A network's batcher input: the array alone, or with the labels of a conditional model."""
    return inputs if labels is None else (inputs, labels)


def _first_non_finite(outputs: np.ndarray) -> int | None:
    """Index of the first item of a batch with a NaN or infinite value, if any."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def probabilities(logits: np.ndarray) -> np.ndarray:
    """P(real) = sigmoid(logit), computed without overflow for large |logit|."""
    return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)


class Handoff:
    """Delivers batcher results to the event loop: one loop wake-up per batch, not per request.

    ``asyncio.wrap_future`` wakes the loop (a write to its self-pipe) for every finished request;
    with 64 single-image requests per batch those writes and wake-ups cost more than the model.
    Here the first result of a burst schedules one delivery and the rest join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future, Future]] = []

    def wrap(self, future: Future) -> asyncio.Future:
        """An asyncio future for ``future``; cancelling it cancels ``future`` (if still queued)."""
        waiter = self.loop.create_future()
        waiter.add_done_callback(lambda w: w.cancelled() and future.cancel())
        future.add_done_callback(lambda f: self._finished(waiter, f))
        return waiter

    def _finished(self, waiter: asyncio.Future, future: Future) -> None:
        with self._lock:
            self._ready.append((waiter, future))
            if len(self._ready) > 1:
                return  # a delivery is already scheduled and will take this one too
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for waiter, future in ready:
            if waiter.done():
                continue  # the caller stopped waiting (cancelled, timed out)
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


class InferenceService:
    def __init__(self, store: ModelStore, config: ServeConfig):
        self.store, self.config = store, config
        self.shutting_down = False
        self._handoff: Handoff | None = None  # made on the first call, on that call's event loop
        self._inflight = 0
        self._idle = threading.Condition()

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Wraps each inference call: refused once shutdown began, counted while in flight."""
        with self._idle:
            if self.shutting_down:
                raise Unavailable("the server is shutting down; retry on another replica")
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls, then wait up to ``timeout`` s for in-flight ones; True if all finished."""
        with self._idle:
            self.shutting_down = True
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    async def _run(self, batcher: DynamicBatcher, inputs: Inputs, call: Call) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._handoff is None or self._handoff.loop is not loop:  # embedding code may switch loops
            self._handoff = Handoff(loop)
        try:
            future = batcher.submit(inputs, call.deadline, call.is_active)
        except QueueFull as exc:
            raise ResourceExhausted(str(exc)) from exc
        except Stopped as exc:
            raise Unavailable(str(exc)) from exc
        try:  # a cancelled wait (timeout, caller gone) cancels the queued request too
            return await asyncio.wait_for(self._handoff.wrap(future), call.remaining())
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while waiting for the model") from None
        except Expired as exc:
            raise DeadlineExceeded(str(exc)) from exc

    def use(self, model: str, version: int) -> contextlib.AbstractContextManager[LoadedVersion]:
        """The version a call runs on, held until the call ends (hot reload waits for it)."""
        return self.store.use(model, version)

    # ------------------------------------------------------------------ sampling

    def latents_for(self, manifest: Manifest, count: int, seed: int | None,
                    explicit: np.ndarray | None) -> tuple[np.ndarray, int]:
        """The latent batch of a request and the seed it used (0 for explicit latents)."""
        size = manifest.latent_size
        if explicit is not None:
            if explicit.ndim != 2 or explicit.shape[1] != size:
                raise InvalidArgument(f"latents have shape {list(explicit.shape)}; model "
                                      f"{manifest.name!r} expects [count, {size}]")
            if count not in (0, len(explicit)):
                raise InvalidArgument(f"count is {count} but latents have {len(explicit)} rows")
            if seed is not None:
                raise InvalidArgument("give either seed or latents, not both")
            outside = ~(np.abs(explicit) <= latent_rng.MAX_ABS_LATENT)  # NaN compares False: caught too
            if outside.any():
                row, column = (int(i) for i in np.argwhere(outside)[0])
                raise InvalidArgument(f"latents[{row}, {column}] = {float(explicit[row, column])}: entries must "
                                      f"be finite (no NaN or infinite values) with |z| <= "
                                      f"{latent_rng.MAX_ABS_LATENT:g}")
            count = len(explicit)
        self.check_count(count)
        if explicit is not None:
            return explicit.astype(np.float32, copy=False), 0
        seed = latent_rng.draw_seed() if seed is None else seed
        try:
            return latent_rng.latents(seed, count, size), seed
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc

    def labels_for(self, manifest: Manifest, count: int, seed: int | None, requested: list[int]) -> np.ndarray | None:
        """The classes of a request: as sent (``count`` values, or one for all), or for a sample
        request that sent none, drawn from its seed (dcgan_core.latents.labels); None for an
        unconditional model."""
        classes, name = manifest.num_classes, manifest.name
        if not classes:
            if requested:
                raise InvalidArgument(f"model {name!r} is not class-conditional: send no labels")
            return None
        if not requested:
            if seed is None:
                raise InvalidArgument(f"model {name!r} is class-conditional: explicit latents need labels "
                                      f"(0..{classes - 1}), one per row or one for all")
            return latent_rng.labels(seed, count, classes)
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

    def check_count(self, count: int) -> None:
        if not 1 <= count <= self.config.max_count:
            raise InvalidArgument(f"count must be in 1..{self.config.max_count}, got {count}")

    async def sample(self, loaded: LoadedVersion, z: np.ndarray, seed: int, include_scores: bool,
                     call: Call, labels: np.ndarray | None = None) -> SampleResult:
        samples = await self._run(loaded.generator, _with(z, labels), call)
        bad = _first_non_finite(samples)
        if bad is not None:  # never an OK answer with NaN pixels (they would encode as zeros)
            raise Internal(f"model {loaded.manifest.name!r} version {loaded.manifest.version}: the generator "
                           f"produced NaN or infinite values for sample {bad}")
        logits = None
        if include_scores:
            logits = await self._run(loaded.discriminator, _with(samples, labels), call)
        return SampleResult(loaded.manifest, loaded.provider, seed, samples, logits, labels)

    # ------------------------------------------------------------------ scoring

    def check_score_inputs(self, manifest: Manifest, inputs: np.ndarray) -> None:
        expected = [*manifest.sample_shape]
        if inputs.ndim != len(expected) + 1 or list(inputs.shape[1:]) != expected:
            raise InvalidArgument(f"inputs have shape {list(inputs.shape)}; model {manifest.name!r} "
                                  f"expects [N, {', '.join(map(str, expected))}]")
        if not 1 <= len(inputs) <= self.config.max_score_images:
            raise InvalidArgument(f"number of images must be in 1..{self.config.max_score_images}, got {len(inputs)}")
        if not np.all(np.isfinite(inputs)):
            bad = int(np.argmax(~np.isfinite(inputs.reshape(len(inputs), -1)).any(1)))
            raise InvalidArgument(f"image {bad} contains NaN or infinite values")
        if manifest.kind == "dcgan":
            low, high = manifest.value_range
            flat = inputs.reshape(len(inputs), -1)
            outside = (flat.min(1) < low - IMAGE_RANGE_SLACK) | (flat.max(1) > high + IMAGE_RANGE_SLACK)
            if outside.any():
                bad = int(np.argmax(outside))
                raise InvalidArgument(f"image {bad} has float32 values outside the model range "
                                      f"[{low}, {high}] (send uint8 0..255, or scale to [-1, 1])")

    async def score(self, loaded: LoadedVersion, inputs: np.ndarray, call: Call,
                    requested_labels: list[int] = ()) -> ScoreResult:
        """Logits of ``inputs``; a class-conditional model scores each image under its label, or
        without labels under every class, keeping the class with the largest logit."""
        manifest = loaded.manifest
        self.check_score_inputs(manifest, inputs)
        inputs = inputs.astype(np.float32, copy=False)
        if manifest.num_classes and not requested_labels:
            classes = manifest.num_classes
            every = (np.concatenate([inputs] * classes), np.repeat(np.arange(classes, dtype=np.int64), len(inputs)))
            table = (await self._run(loaded.discriminator, every, call)).reshape(classes, len(inputs))
            labels, logits = table.argmax(axis=0), table.max(axis=0)
        else:
            labels = self.labels_for(manifest, len(inputs), None, list(requested_labels))
            logits = await self._run(loaded.discriminator, _with(inputs, labels), call)
        bad = _first_non_finite(logits)
        if bad is not None:
            raise InvalidArgument(f"input {bad} gives a NaN or infinite logit: its values are too large "
                                  f"for model {loaded.manifest.name!r}")
        return ScoreResult(manifest, loaded.provider, logits, labels)

    def chunks(self, count: int, chunk_size: int) -> list[tuple[int, int]]:
        """(offset, size) of each SampleStream message."""
        size = chunk_size or self.config.stream_chunk_size
        if size < 0:
            raise InvalidArgument(f"chunk_size must be >= 0, got {chunk_size}")
        return [(start, min(size, count - start)) for start in range(0, count, size)]

    def response_bytes(self, manifest: Manifest, count: int, bytes_per_value: int) -> int:
        return count * math.prod(manifest.sample_shape) * bytes_per_value
