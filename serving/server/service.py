"""The inference service: the one API every front end calls, with domain values, free of gRPC.

``sample``, ``stream``, ``walk``, ``score``, ``models``, ``model`` and ``reload`` take the
requests of serving.server.plans and return model-range float32 arrays (dcgan_core.images) with what
produced them; a front end only translates its protocol to these and back. The calls are
coroutines: a call waits for its batch without holding a thread, so one event loop serves every
connection (threads cost a GIL hand-off per call, which dominated the cost of small requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from dcgan_core.repository import Manifest
from serving.server import inputs as score_inputs
from serving.server import plans
from serving.server.batcher import DynamicBatcher, Expired, Inputs, QueueFull, Stopped
from serving.server.config import ServeConfig
from serving.server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from serving.server.handoff import Handoff
from serving.server.inputs import ScoreSpec
from serving.server.plans import SamplePlan, SampleSpec, WalkSpec
from serving.server.store import LoadedVersion, ModelEntry, ModelStore

BYTES_PER_VALUE = {"float32": 4, "uint8": 1, "png": 1}  # response sizing: PNG is bounded by raw uint8


@dataclass(frozen=True)
class Call:
    """Per-call context: absolute deadline (time.monotonic) and whether the caller is still there."""

    deadline: float | None = None
    is_active: Callable[[], bool] = lambda: True

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def within(self, seconds: float) -> Call:
        """The same call, due in ``seconds`` at the latest (a front end's own timeout field)."""
        due = time.monotonic() + seconds
        return Call(due if self.deadline is None else min(self.deadline, due), self.is_active)


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
    encoding: str = "float32"  # how the front end should send the samples (serving.wire.ENCODINGS)
    offset: int = 0  # index of the first sample within the request (SampleStream chunks)

    def part(self, start: int, stop: int) -> "SampleResult":
        """Samples [start, stop) of this result (one SampleStream chunk)."""
        def cut(array):
            return None if array is None else array[start:stop]
        return SampleResult(self.manifest, self.provider, self.seed, self.samples[start:stop], cut(self.logits),
                            cut(self.labels), self.candidates, cut(self.candidate_indices), self.encoding,
                            self.offset + start)


@dataclass
class ScoreResult:
    manifest: Manifest
    provider: str
    logits: np.ndarray
    labels: np.ndarray | None = None  # class-conditional models: the class each image was scored under
    anomaly: np.ndarray | None = None  # with ScoreSpec.anomaly: the f-AnoGAN score (higher: less like the data)
    anomaly_percentile: np.ndarray | None = None  # the share of held-out real images scoring at most it

    @property
    def probabilities(self) -> np.ndarray:
        return probabilities(self.logits)


@dataclass
class TranslateResult:
    """Source images translated by a translation model's generator (model range), and the
    discriminator's logits of the (source, translation) pairs when asked."""

    manifest: Manifest
    provider: str
    samples: np.ndarray
    logits: np.ndarray | None
    encoding: str

    @property
    def probabilities(self) -> np.ndarray | None:
        return None if self.logits is None else probabilities(self.logits)


@dataclass
class ProjectResult:
    """Images' latents E(x), reconstructions G(E(x)) (model range) and anomaly scores."""

    manifest: Manifest
    provider: str
    latents: np.ndarray
    reconstructions: np.ndarray
    encoding: str
    anomaly: np.ndarray
    anomaly_percentile: np.ndarray
    labels: np.ndarray | None = None


#: An unlabelled image's class is named (ScoreResponse.labels) only by a version whose class
#: choice (the class that reconstructs it best) was right this often on held-out digits
#: (manifest anomaly.class_accuracy). The discriminator's most likely class is never named: on
#: mnist-cond/2 it said "1" for 9 of 12 real test digits.
REPORTED_CLASS_ACCURACY = 0.98


def _need_kind(loaded: LoadedVersion, translating: bool) -> None:
    """Translate is for translation models, everything else for the others: FAILED_PRECONDITION
    saying which call the model takes."""
    m = loaded.manifest
    if translating and m.kind != "translation":
        raise FailedPrecondition(f"model {m.name!r} is a {m.kind} model, not a translation model: it takes "
                                 f"Sample, Walk and Score, not Translate")
    if not translating and m.kind == "translation":
        raise FailedPrecondition(f"model {m.name!r} translates images (kind translation): send it source images "
                                 f"(dcgan.v1 Translate, OIP input 'source', POST /v1/models/{m.name}/translate)")


def _need_encoder(loaded: LoadedVersion, what: str) -> None:
    if loaded.encoder is None:
        m = loaded.manifest
        raise FailedPrecondition(f"model {m.name!r} version {m.version} has no encoder, so no {what}: publish "
                                 f"an encoder run (dcgan-train --preset encoder) as a version")


def _percentiles(manifest: Manifest, scores: np.ndarray) -> np.ndarray:
    """Each score's share among the held-out real images the manifest's quantiles describe."""
    quantiles = manifest.anomaly["quantiles"]
    return np.interp(scores, quantiles, np.linspace(0.0, 1.0, len(quantiles))).astype(np.float32)


def _under_every_class(inputs: np.ndarray, classes: int) -> Inputs:
    """The batch repeated once per class, with the labels 0, 0, ..., 1, 1, ...: row c * N + i is
    input i under class c."""
    return np.concatenate([inputs] * classes), np.repeat(np.arange(classes, dtype=np.int64), len(inputs))


def _with(inputs: np.ndarray, labels: np.ndarray | None) -> Inputs:
    """A network's batcher input: the array alone, or with the labels of a conditional model."""
    return inputs if labels is None else (inputs, labels)


async def _off_loop_if(heavy: bool, function: Callable, *args):
    """``function(*args)``, in a worker thread when ``heavy``: other calls must not wait on the
    event loop (a truncated latent row takes up to a millisecond of redraws at small thresholds)."""
    return await asyncio.to_thread(function, *args) if heavy else function(*args)


def _check_logits(manifest: Manifest, logits: np.ndarray) -> None:
    """InvalidArgument naming the first input whose logit is NaN or infinite."""
    bad = _first_non_finite(logits)
    if bad is not None:
        raise InvalidArgument(f"input {bad} gives a NaN or infinite logit: its values are too large "
                              f"for model {manifest.name!r}")


def _first_non_finite(outputs: np.ndarray) -> int | None:
    """Index of the first item of a batch with a NaN or infinite value, if any."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def probabilities(logits: np.ndarray) -> np.ndarray:
    """P(real) = sigmoid(logit), computed without overflow for large |logit|."""
    return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)


@dataclass(frozen=True)
class VersionCard:
    version: int
    state: str  # READY | FAILED | UNLOADED (on disk, not selected by the version policy)
    provider: str = ""
    error: str = ""
    manifest_json: str = ""
    encoder: bool = False  # the version has an anomaly scorer (Score with anomaly, Project)


@dataclass(frozen=True)
class ModelCard:
    """What a front end says about one model: its versions and, from the latest ready one (or a
    failed one's readable manifest), its kind and shapes."""

    name: str
    versions: list[VersionCard]
    latest_version: int = 0
    kind: str = ""
    latent_size: int = 0
    sample_shape: list[int] = field(default_factory=list)
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    version_policy: str = ""
    source_shape: list[int] = field(default_factory=list)  # translation models: (C, h, w) of a source


def model_card(entry: ModelEntry) -> ModelCard:
    ready = entry.ready()
    versions = [VersionCard(v, s.state, s.loaded.provider if s.loaded else "", s.error, s.manifest_json,
                            bool(s.loaded and s.loaded.encoder))
                for v, s in sorted(entry.versions.items())]
    manifests = [s.loaded.manifest for _, s in sorted(entry.versions.items()) if s.loaded]
    if manifests:
        m = manifests[-1]
        return ModelCard(entry.name, versions, ready[-1], m.kind, m.latent_size, list(m.sample_shape),
                         m.num_classes, list(m.class_names), entry.policy, m.source_shape)
    for state in entry.versions.values():  # describe a failed model from its manifest, if readable
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data = json.loads(state.manifest_json)
            return ModelCard(entry.name, versions, 0, data["kind"], data["latent_size"], version_policy=entry.policy)
    return ModelCard(entry.name, versions, version_policy=entry.policy)


def resolve_encoding(encoding: str, manifest: Manifest) -> str:
    """The encoding a response uses: ``auto`` is uint8 for image models, float32 for 2-D points."""
    if encoding == "auto":
        return "float32" if manifest.kind == "toy2d" else "uint8"
    if encoding not in BYTES_PER_VALUE:
        raise InvalidArgument(f"unknown encoding {encoding}")
    if manifest.kind == "toy2d" and encoding != "float32":
        raise InvalidArgument(f"model {manifest.name!r} generates 2-D points: use ENCODING_RAW_FLOAT32")
    return encoding


class InferenceService:
    """Validates, plans, batches and runs every call of every front end."""

    def __init__(self, store: ModelStore, config: ServeConfig, reload: Callable[[], None] | None = None):
        self.store, self.config = store, config
        self.limits = plans.Limits(config.max_count, config.max_candidates)
        self._reload = reload or store.rescan
        self.shutting_down = False
        self._handoff: Handoff | None = None  # made on the first call, on that call's event loop
        self._inflight = 0
        self._idle = threading.Condition()

    # ------------------------------------------------------------------ the API

    async def sample(self, spec: SampleSpec, call: Call) -> SampleResult:
        """The samples of one request, in one result."""
        [result] = [part async for part in self._sampled(spec, call, chunk_size=None)]
        return result

    async def stream(self, spec: SampleSpec, chunk_size: int, call: Call) -> AsyncIterator[SampleResult]:
        """The same samples in chunks of ``chunk_size`` (0: the server's default)."""
        async for part in self._sampled(spec, call, chunk_size):
            yield part

    async def walk(self, walk: WalkSpec, call: Call) -> SampleResult:
        with self.admitted(), self.store.use(walk.model, walk.version) as loaded:
            _need_kind(loaded, translating=False)
            encoding = resolve_encoding(walk.encoding, loaded.manifest)
            heavy = walk.truncation is not None  # truncated ends take redraws: off the event loop
            z, labels = await _off_loop_if(heavy, plans.walk_latents, loaded.manifest, walk, self.limits)
            self._check_size(loaded.manifest, len(z), encoding, "ask for fewer steps")
            result = await self._sample_latents(loaded, z, 0, walk.include_scores, call, labels)
            result.encoding = encoding
            return result

    async def score(self, spec: ScoreSpec, call: Call) -> ScoreResult:
        """Logits of the images; a class-conditional model scores each under its label, or
        without labels under every class, keeping the largest logit. With ``spec.anomaly`` the
        version's scorer gives the logits and the anomaly scores in one run. Unlabelled images'
        classes are named only where the version's measured class accuracy earns it."""
        with self.admitted(), self.store.use(spec.model, spec.version) as loaded:
            _need_kind(loaded, translating=False)
            if spec.anomaly:
                _need_encoder(loaded, "anomaly score")
            inputs = await self._inputs(loaded, spec)
            if not spec.anomaly:
                return await self._score(loaded, inputs, call, spec.labels)
            (_, _, scores, logits), labels = await self._encode(loaded, inputs, call, spec.labels)
            _check_logits(loaded.manifest, logits)
            named = spec.labels or loaded.manifest.anomaly.get("class_accuracy", 0.0) >= REPORTED_CLASS_ACCURACY
            return ScoreResult(loaded.manifest, loaded.provider, logits, labels if named else None, scores,
                               _percentiles(loaded.manifest, scores))

    async def project(self, spec: ScoreSpec, encoding: str, call: Call) -> ProjectResult:
        """Latents of the images (E(x)), their reconstructions and anomaly scores; a conditional
        model's images are taken as their labels, or as the class that reconstructs them best."""
        with self.admitted(), self.store.use(spec.model, spec.version) as loaded:
            _need_kind(loaded, translating=False)
            _need_encoder(loaded, "projection")
            encoding = resolve_encoding(encoding, loaded.manifest)
            inputs = await self._inputs(loaded, spec)
            (latents, reconstructions, scores, _), labels = await self._encode(loaded, inputs, call, spec.labels)
            return ProjectResult(loaded.manifest, loaded.provider, latents, reconstructions, encoding, scores,
                                 _percentiles(loaded.manifest, scores), labels)

    async def translate(self, spec: ScoreSpec, encoding: str, include_scores: bool, call: Call) -> TranslateResult:
        """The source images translated by the model's generator and, with ``include_scores``, the
        discriminator's logits of each (source, translation) pair."""
        with self.admitted(), self.store.use(spec.model, spec.version) as loaded:
            _need_kind(loaded, translating=True)
            encoding = resolve_encoding(encoding, loaded.manifest)
            sources = await self._inputs(loaded, spec)
            self._check_size(loaded.manifest, len(sources), encoding, "send fewer images per call")
            samples = await self._run(loaded.generator, sources, call)
            logits = await self._run(loaded.discriminator, (samples, sources), call) if include_scores else None
            return TranslateResult(loaded.manifest, loaded.provider, samples, logits, encoding)

    async def score_pairs(self, spec: ScoreSpec, sources: ScoreSpec, call: Call) -> ScoreResult:
        """A translation model's discriminator on (source, image) pairs: how real it finds each
        image as a translation of its source."""
        with self.admitted(), self.store.use(spec.model, spec.version) as loaded:
            _need_kind(loaded, translating=True)
            samples = await self._inputs(loaded, spec, list(loaded.manifest.sample_shape))
            paired = await self._inputs(loaded, sources)
            if len(paired) != len(samples):
                raise InvalidArgument(f"{len(samples)} images but {len(paired)} sources: one source per image")
            logits = await self._run(loaded.discriminator, (samples, paired), call)
            return ScoreResult(loaded.manifest, loaded.provider, logits)

    async def _encode(self, loaded: LoadedVersion, inputs: np.ndarray, call: Call,
                      requested_labels: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
        """The scorer's outputs (latents, reconstructions, anomaly scores, logits) and the labels
        they were made under: the requested ones, or for a conditional model without labels the
        class whose reconstruction scores lowest (the image's anomaly is its distance to the
        nearest class)."""
        manifest = loaded.manifest
        if not manifest.num_classes or requested_labels:
            labels = plans.labels_for(manifest, len(inputs), requested_labels)
            return await self._run(loaded.encoder, _with(inputs, labels), call), labels
        count, classes = len(inputs), manifest.num_classes
        outputs = await self._run(loaded.encoder, _under_every_class(inputs, classes), call)
        labels = outputs[2].reshape(classes, count).argmin(axis=0)
        rows = labels * count + np.arange(count)
        return tuple(output[rows] for output in outputs), labels

    async def _inputs(self, loaded: LoadedVersion, spec: ScoreSpec, shape: list[int] | None = None) -> np.ndarray:
        """A Score, Project or Translate request's images as the model's float32 batch (PNG/JPEG
        decoding takes milliseconds per image: off the event loop); ``shape``: one image's, if not
        the model's input shape."""
        limit = self.config.max_score_images
        inputs = await _off_loop_if(bool(spec.images), score_inputs.model_inputs, spec, loaded.manifest, limit, shape)
        score_inputs.check(loaded.manifest, inputs, limit, shape)
        return inputs.astype(np.float32, copy=False)

    def models(self) -> tuple[list[ModelCard], str]:
        """Every model of the repository, by name, and the default model's name."""
        return [model_card(e) for _, e in sorted(self.store.models().items())], self.store.default_model

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a model of the repository (cheap: for per-call name checks)."""
        return self.store.serves(name)

    def model(self, name: str) -> ModelCard:
        """One model ("": the default); NOT_FOUND names the models there are."""
        return model_card(self.store.entry(name))

    def reload(self) -> tuple[list[ModelCard], str]:
        """Rescan the repository now (blocking: loading takes seconds), then list the models."""
        self._reload()
        return self.models()

    def record_call(self, method: str, model: str, code: str, seconds: float) -> None:
        """Count and time one call of any front end. The model label is a served model's name or
        ``unknown``: names sent by clients never become label values (each would be a time series
        forever)."""
        name = model or self.store.default_model
        label = name if self.store.serves(name) else "unknown"
        self.store.metrics.requests.labels(method, label, code).inc()
        self.store.metrics.request_latency.labels(method).observe(seconds)

    # ------------------------------------------------------------------ admission and batches

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

    def _check_size(self, manifest: Manifest, count: int, encoding: str, hint: str) -> None:
        size = count * math.prod(manifest.sample_shape) * BYTES_PER_VALUE[encoding]
        if size > self.config.max_message_bytes:
            raise ResourceExhausted(f"a response of {count} samples is about {size} bytes, over the "
                                    f"{self.config.max_message_mb} MiB message limit; {hint}")

    # ------------------------------------------------------------------ sampling

    async def _sampled(self, spec: SampleSpec, call: Call, chunk_size: int | None) -> AsyncIterator[SampleResult]:
        """The samples of ``spec``, whole (``chunk_size`` None) or in chunks; guided sampling
        chooses every sample before the first chunk goes out."""
        with self.admitted(), self.store.use(spec.model, spec.version) as loaded:
            _need_kind(loaded, translating=False)
            encoding = resolve_encoding(spec.encoding, loaded.manifest)
            heavy = spec.truncation is not None  # truncated rows take redraws: off the event loop
            plan = await _off_loop_if(heavy, plans.plan, loaded.manifest, spec, self.limits)
            if chunk_size is None:
                parts = [(0, plan.count)]
                self._check_size(loaded.manifest, plan.count, encoding, "use SampleStream or a smaller count")
            else:
                parts = plans.chunks(plan.count, chunk_size, self.config.stream_chunk_size)
                self._check_size(loaded.manifest, parts[0][1], encoding, "use a smaller chunk_size")
            async for result in self._parts(loaded, plan, parts, call):
                result.encoding = encoding
                yield result

    async def _parts(self, loaded: LoadedVersion, plan: SamplePlan, parts: list[tuple[int, int]],
                     call: Call) -> AsyncIterator[SampleResult]:
        if plan.stream is not None:
            whole = await self._sample_guided(loaded, plan, call)
            for offset, size in parts:
                yield whole.part(offset, offset + size)
            return
        for offset, size in parts:
            rows = slice(offset, offset + size)
            result = await self._sample_latents(loaded, plan.latents[rows], plan.seed, plan.spec.include_scores,
                                                call, None if plan.labels is None else plan.labels[rows])
            result.offset = offset
            yield result

    async def _sample_latents(self, loaded: LoadedVersion, z: np.ndarray, seed: int, include_scores: bool,
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

    async def _sample_guided(self, loaded: LoadedVersion, plan: SamplePlan, call: Call) -> SampleResult:
        """Keep the candidates the discriminator finds convincing (the .proto defines which)."""
        spec, limit = plan.spec, self.config.max_candidates
        if spec.keep_top is not None:
            drawn = plans.candidates_for(plan.count, spec.keep_top)
            if drawn > limit:
                raise ResourceExhausted(f"keep_top = {np.float32(spec.keep_top)} of {plan.count} samples needs "
                                        f"{drawn} candidates, over the server's limit of {limit} per request "
                                        f"(--max-candidates): raise keep_top or ask for fewer")
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

    # ------------------------------------------------------------------ scoring

    async def _score(self, loaded: LoadedVersion, inputs: np.ndarray, call: Call,
                     requested_labels: tuple[int, ...]) -> ScoreResult:
        manifest = loaded.manifest
        if manifest.num_classes and not requested_labels:
            classes = manifest.num_classes
            every = _under_every_class(inputs, classes)
            table = (await self._run(loaded.discriminator, every, call)).reshape(classes, len(inputs))
            labels, logits = table.argmax(axis=0), table.max(axis=0)
        else:
            labels = plans.labels_for(manifest, len(inputs), requested_labels)
            logits = await self._run(loaded.discriminator, _with(inputs, labels), call)
        _check_logits(manifest, logits)
        return ScoreResult(manifest, loaded.provider, logits, labels if requested_labels else None)
