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
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from fractions import Fraction

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


@dataclass(frozen=True)
class SampleSpec:
    """What a Sample request asks for, as the proto documents it (wire types already decoded)."""

    count: int
    seed: int | None = None
    latents: np.ndarray | None = None  # explicit latents instead of a seed
    labels: tuple[int, ...] = ()
    truncation: float | None = None
    min_score: float | None = None  # discriminator-guided sampling: a threshold, or
    keep_top: float | None = None  # the share of candidates to keep
    include_scores: bool = False

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


@dataclass
class SampleResult:
    manifest: Manifest
    provider: str
    seed: int
    samples: np.ndarray  # float32, model range
    logits: np.ndarray | None
    labels: np.ndarray | None = None  # class-conditional models: the class of each sample
    candidates: int = 0  # guided sampling: candidates drawn and scored for the whole request
    candidate_indices: np.ndarray | None = None  # guided sampling: each kept sample's candidate index

    def part(self, start: int, stop: int) -> "SampleResult":
        """Samples [start, stop) of this result (one SampleStream chunk)."""
        def cut(array):
            return None if array is None else array[start:stop]
        return SampleResult(self.manifest, self.provider, self.seed, self.samples[start:stop], cut(self.logits),
                            cut(self.labels), self.candidates, cut(self.candidate_indices))


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


async def _off_loop_if(heavy: bool, function: Callable, *args):
    """``function(*args)``, in a worker thread when ``heavy``: other calls must not wait on the
    event loop (a truncated latent row takes up to a millisecond of redraws at small thresholds)."""
    return await asyncio.to_thread(function, *args) if heavy else function(*args)


def _first_non_finite(outputs: np.ndarray) -> int | None:
    """Index of the first item of a batch with a NaN or infinite value, if any."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def keep_top_share(keep_top: float) -> Fraction:
    """keep_top as the .proto defines it: the shortest decimal that rounds to the float32 the client
    sent (0.7f is 0.699999988...: it reads 0.7, so 7 samples take 10 candidates, not 11), exact.

    Exact, not rounded to a few decimals: a rounded share may become 0 (1e-7) or shift
    ceil(count / keep_top) by one; numpy prints a float32 as exactly this shortest decimal.
    """
    return Fraction(str(np.float32(keep_top)))


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

    def plan(self, manifest: Manifest, spec: SampleSpec) -> SamplePlan:
        """Validate a sample request and fix what it produces: latents, labels and seed."""
        self._check_controls(spec)
        if spec.latents is not None:
            z = self.check_latents(manifest, spec.latents, "latents")
            if spec.count not in (0, len(z)):
                raise InvalidArgument(f"count is {spec.count} but latents have {len(z)} rows")
            if spec.seed is not None:
                raise InvalidArgument("give either seed or latents, not both")
            self.check_count(len(z))
            return SamplePlan(spec, len(z), 0, z, self.labels_for(manifest, len(z), spec.labels))
        self.check_count(spec.count)
        seed = latent_rng.draw_seed() if spec.seed is None else spec.seed
        try:
            stream = latent_rng.LatentStream(seed, manifest.latent_size, manifest.num_classes, spec.truncation)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        if spec.guided:
            return SamplePlan(spec, spec.count, seed, None, None, stream, self._guided_label(manifest, spec.labels))
        z, drawn = stream.take(spec.count)
        return SamplePlan(spec, spec.count, seed, z, self.labels_for(manifest, spec.count, spec.labels, drawn))

    async def draw_plan(self, manifest: Manifest, spec: SampleSpec) -> SamplePlan:
        """:meth:`plan` off the event loop when its latents are truncated."""
        return await _off_loop_if(spec.truncation is not None, self.plan, manifest, spec)

    @staticmethod
    def _check_truncation(truncation: float | None) -> None:
        if truncation is not None:
            try:
                latent_rng.check_truncation(truncation)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc

    def _check_controls(self, spec: SampleSpec) -> None:
        self._check_truncation(spec.truncation)
        if spec.min_score is not None and spec.keep_top is not None:
            raise InvalidArgument("give min_score or keep_top, not both")
        for name, value in (("min_score", spec.min_score), ("keep_top", spec.keep_top)):
            if value is not None and not 0 < value < 1:  # NaN fails too
                raise InvalidArgument(f"{name} = {value} is out of range: use a value in (0, 1), exclusive")
        if spec.latents is not None and (spec.truncation is not None or spec.guided):
            raise InvalidArgument("truncation and discriminator-guided sampling draw their latents from a "
                                  "seed: send a seed (or none), not latents")

    def check_latents(self, manifest: Manifest, explicit: np.ndarray, what: str) -> np.ndarray:
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

    def labels_for(self, manifest: Manifest, count: int, requested: tuple[int, ...] | list[int],
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

    def _guided_label(self, manifest: Manifest, requested: tuple[int, ...]) -> int | None:
        if len(requested) > 1:
            raise InvalidArgument(f"discriminator-guided sampling takes one label for every sample (or none), "
                                  f"got {len(requested)}")
        return int(self.labels_for(manifest, 1, requested)[0]) if requested else None

    def check_count(self, count: int) -> None:
        if not 1 <= count <= self.config.max_count:
            raise InvalidArgument(f"count must be in 1..{self.config.max_count}, got {count}")

    async def results(self, loaded: LoadedVersion, plan: SamplePlan, chunks: list[tuple[int, int]],
                      call: Call) -> AsyncIterator[tuple[int, SampleResult]]:
        """The samples of ``plan`` as (offset, result) per chunk; guided sampling chooses every
        sample before the first chunk goes out."""
        if plan.stream is not None:
            whole = await self.sample_guided(loaded, plan, call)
            for offset, size in chunks:
                yield offset, whole.part(offset, offset + size)
            return
        for offset, size in chunks:
            part = slice(offset, offset + size)
            yield offset, await self.sample(loaded, plan.latents[part], plan.seed, plan.spec.include_scores, call,
                                            None if plan.labels is None else plan.labels[part])

    async def sample(self, loaded: LoadedVersion, z: np.ndarray, seed: int, include_scores: bool,
                     call: Call, labels: np.ndarray | None = None) -> SampleResult:
        samples = await self._generate(loaded, z, labels, call)
        logits = None
        if include_scores:
            logits = await self._run(loaded.discriminator, _with(samples, labels), call)
        return SampleResult(loaded.manifest, loaded.provider, seed, samples, logits, labels)

    async def _generate(self, loaded: LoadedVersion, z: np.ndarray, labels: np.ndarray | None,
                        call: Call) -> np.ndarray:
        samples = await self._run(loaded.generator, _with(z, labels), call)
        bad = _first_non_finite(samples)
        if bad is not None:  # never an OK answer with NaN pixels (they would encode as zeros)
            raise Internal(f"model {loaded.manifest.name!r} version {loaded.manifest.version}: the generator "
                           f"produced NaN or infinite values for sample {bad}")
        return samples

    # ------------------------------------------------------------------ discriminator-guided sampling

    async def sample_guided(self, loaded: LoadedVersion, plan: SamplePlan, call: Call) -> SampleResult:
        """Keep the candidates the discriminator finds convincing (the .proto defines which)."""
        spec, limit = plan.spec, self.config.max_candidates
        if spec.keep_top is not None:
            share = keep_top_share(spec.keep_top)
            drawn = math.ceil(plan.count / share)
            if drawn > limit:
                raise ResourceExhausted(f"keep_top = {np.float32(spec.keep_top)} of {plan.count} samples needs {drawn} candidates, "
                                        f"over the server's limit of {limit} per request (--max-candidates): "
                                        f"raise keep_top or ask for fewer")
            samples, logits, labels = await self._candidates(loaded, plan, drawn, call)
            kept = np.sort(np.argsort(-logits, kind="stable")[:plan.count])
            return self._guided_result(loaded, plan, drawn, [(kept, samples[kept], logits[kept],
                                                              None if labels is None else labels[kept])])
        rounds, kept, drawn = [], 0, 0
        while kept < plan.count:
            if drawn >= limit:
                raise ResourceExhausted(f"discriminator-guided sampling: {kept} of {drawn} candidates scored "
                                        f">= min_score {spec.min_score:.6g}, {plan.count} were asked for; the "
                                        f"server draws at most {limit} candidates per request "
                                        f"(--max-candidates): lower min_score or ask for fewer")
            size = self._round_size(plan.count - kept, kept, drawn)
            samples, logits, labels = await self._candidates(loaded, plan, size, call)
            passed = np.flatnonzero(probabilities(logits) >= spec.min_score)[: plan.count - kept]
            rounds.append((drawn + passed, samples[passed], logits[passed], None if labels is None else labels[passed]))
            kept, drawn = kept + len(passed), drawn + size
        return self._guided_result(loaded, plan, drawn, rounds)

    def _round_size(self, needed: int, kept: int, drawn: int) -> int:
        """Candidates to draw next: enough for the samples still needed at the acceptance rate so
        far (taken as >= 5%), with a margin, at least one batch, within the request's limit."""
        rate = max(kept / drawn, 0.05) if drawn else 1.0
        wanted = max(math.ceil(1.2 * needed / rate), self.config.max_batch_size)
        return min(wanted, self.config.max_candidates - drawn)

    async def _candidates(self, loaded: LoadedVersion, plan: SamplePlan, count: int,
                          call: Call) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The next ``count`` candidates of the plan's stream: samples, logits and labels."""
        z, labels = await asyncio.to_thread(plan.stream.take, count)  # (thousands of rows: not on the loop)
        if plan.label is not None:
            labels = np.full(count, plan.label, dtype=np.int64)
        samples = await self._generate(loaded, z, labels, call)
        logits = await self._run(loaded.discriminator, _with(samples, labels), call)
        return samples, logits, labels

    @staticmethod
    def _guided_result(loaded: LoadedVersion, plan: SamplePlan, drawn: int, rounds: list[tuple]) -> SampleResult:
        indices, samples, logits, labels = (list(parts) for parts in zip(*rounds))
        return SampleResult(loaded.manifest, loaded.provider, plan.seed, np.concatenate(samples),
                            np.concatenate(logits), None if labels[0] is None else np.concatenate(labels),
                            drawn, np.concatenate(indices))

    # ------------------------------------------------------------------ latent walks

    def walk_latents(self, manifest: Manifest, start: Endpoint, end: Endpoint, steps: int, method: str,
                     truncation: float | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The latents (and labels) of a walk's frames."""
        if not 2 <= steps <= self.config.max_count:
            raise InvalidArgument(f"steps = {steps} is out of range: a walk has 2..{self.config.max_count} frames")
        self._check_truncation(truncation)
        (a, label_a), (b, label_b) = (self._endpoint(manifest, point, truncation, name)
                                      for point, name in ((start, "start"), (end, "end")))
        if label_a != label_b:
            raise InvalidArgument(f"the ends of the walk have classes {label_a} and {label_b}: walks between "
                                  f"classes are not supported, give both ends the same label")
        try:
            path = latent_rng.interpolate(a, b, steps, method)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        return path, None if label_a is None else np.full(steps, label_a, dtype=np.int64)

    async def draw_walk(self, manifest: Manifest, start: Endpoint, end: Endpoint, steps: int, method: str,
                        truncation: float | None) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`walk_latents` off the event loop when its ends are truncated."""
        return await _off_loop_if(truncation is not None, self.walk_latents, manifest, start, end, steps, method,
                                  truncation)

    def _endpoint(self, manifest: Manifest, point: Endpoint, truncation: float | None,
                  name: str) -> tuple[np.ndarray, int | None]:
        requested = () if point.label is None else (point.label,)
        if point.latent is not None:
            if len(point.latent) != manifest.latent_size:
                raise InvalidArgument(f"{name}.latent has {len(point.latent)} entries; model {manifest.name!r} "
                                      f"has latent size {manifest.latent_size}")
            z = self.check_latents(manifest, point.latent.reshape(1, -1), f"{name}.latent")[0]
            labels = self.labels_for(manifest, 1, requested)
        elif point.seed is None:
            raise InvalidArgument(f"{name}: give a seeded point or an explicit latent")
        else:
            if not 0 <= point.index < self.config.max_count:
                raise InvalidArgument(f"{name}.seeded.index = {point.index} is out of range: "
                                      f"0..{self.config.max_count - 1}")
            try:
                stream = latent_rng.LatentStream(point.seed, manifest.latent_size, manifest.num_classes, truncation)
            except ValueError as exc:
                raise InvalidArgument(f"{name}: {exc}") from exc
            z, drawn = stream.row(point.index)
            labels = self.labels_for(manifest, 1, requested, None if drawn is None else np.array([drawn]))
        return z, None if labels is None else int(labels[0])

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
            labels = self.labels_for(manifest, len(inputs), tuple(requested_labels))
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
