"""The gRPC servicer (grpc.aio): translates protobuf requests to InferenceService calls and back.

Handlers run on the server's event loop and must not block it: waiting for the model is awaited,
and the work that takes milliseconds per call (PNG encoding and decoding, reloading models) runs
in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator

import grpc

from dcgan.v1 import inference_pb2 as pb
from dcgan.v1 import inference_pb2_grpc as pb_grpc
from serving import codec
from serving.errors import Internal, ResourceExhausted, ServiceError, bounded
from serving.metrics import ServingMetrics
from serving.service import Call, InferenceService, SampleResult, probabilities
from serving.store import FAILED, READY, ModelEntry

log = logging.getLogger(__name__)
UNKNOWN_MODEL = "unknown"  # the metrics label of calls naming no served model
VERSION_STATES = {READY: pb.VERSION_STATE_READY, FAILED: pb.VERSION_STATE_FAILED}
BYTES_PER_VALUE = {pb.ENCODING_RAW_FLOAT32: 4, pb.ENCODING_RAW_UINT8: 1, pb.ENCODING_PNG: 1}


NO_DEADLINE_S = 10**7  # grpc reports "no deadline" as an enormous time_remaining()


def call_of(context: grpc.aio.ServicerContext) -> Call:
    remaining = context.time_remaining()
    deadline = None if remaining is None or remaining > NO_DEADLINE_S else time.monotonic() + remaining
    ended = threading.Event()  # read by the batcher's thread: set once the RPC is over (e.g. cancelled)
    context.add_done_callback(lambda _: ended.set())
    return Call(deadline, lambda: not ended.is_set())


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, service: InferenceService, metrics: ServingMetrics, reload=lambda: None):
        self.service, self.metrics, self.reload = service, metrics, reload

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, model: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Count and time the call; a ServiceError becomes the gRPC status it names, anything
        unexpected INTERNAL (logged with its traceback), never grpc's UNKNOWN.

        The call is counted before the status goes out, so a client that has its answer can
        already see it in the metrics. The model label is a served model's name or ``unknown``:
        names sent by clients never become label values (each would be a time series forever).
        """
        start, code, error = time.perf_counter(), "OK", None
        try:
            yield
        except ServiceError as exc:
            code, error = exc.code, exc
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence for one call
            log.exception("%s failed unexpectedly", method)
            code, error = "INTERNAL", Internal(f"internal error in {method} ({type(exc).__name__}); "
                                               f"the server logged the details")
        finally:
            self.metrics.requests.labels(method, self._model_label(model), code).inc()
            self.metrics.request_latency.labels(method).observe(time.perf_counter() - start)
        if error is not None:
            await context.abort(getattr(grpc.StatusCode, error.code), bounded(str(error)))

    def _model_label(self, model: str) -> str:
        store = self.service.store
        name = model or store.default_model
        return name if name in store.models() else UNKNOWN_MODEL

    def _response(self, result: SampleResult, encoding: int, offset: int) -> pb.SampleResponse:
        response = pb.SampleResponse(model=result.manifest.name, version=result.manifest.version,
                                     seed=result.seed, offset=offset, provider=result.provider)
        codec.encode_samples(response, result.samples, encoding)
        if result.labels is not None:
            response.labels.extend(result.labels.tolist())
        if result.candidate_indices is not None:
            response.candidates = result.candidates
            response.candidate_indices.extend(result.candidate_indices.tolist())
        if result.logits is not None:
            response.logits.extend(result.logits.tolist())
            response.scores.extend(probabilities(result.logits).tolist())
        return response

    def _check_size(self, loaded, count: int, encoding: int, hint: str) -> None:
        size = self.service.response_bytes(loaded.manifest, count, BYTES_PER_VALUE[encoding])
        if size > self.service.config.max_message_bytes:
            raise ResourceExhausted(f"a response of {count} samples is about {size} bytes, over the "
                                    f"{self.service.config.max_message_mb} MiB message limit; {hint}")

    async def _encoded(self, result: SampleResult, encoding: int, offset: int) -> pb.SampleResponse:
        if encoding == pb.ENCODING_PNG:
            return await asyncio.to_thread(self._response, result, encoding, offset)
        return self._response(result, encoding, offset)

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        async with self._rpc("Sample", request.model, context):
            with self.service.admitted(), self.service.use(request.model, request.version) as loaded:
                encoding = codec.resolve_encoding(request.encoding, loaded.manifest)
                plan = await self.service.draw_plan(loaded.manifest, codec.sample_spec(request))
                self._check_size(loaded, plan.count, encoding, "use SampleStream or a smaller count")
                [(_, result)] = [part async for part in self.service.results(loaded, plan, [(0, plan.count)],
                                                                             call_of(context))]
                return await self._encoded(result, encoding, 0)

    async def SampleStream(self, request: pb.SampleStreamRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SampleStreamResponse]:
        sample = request.sample
        async with self._rpc("SampleStream", sample.model, context):
            with self.service.admitted(), self.service.use(sample.model, sample.version) as loaded:
                encoding = codec.resolve_encoding(sample.encoding, loaded.manifest)
                plan = await self.service.draw_plan(loaded.manifest, codec.sample_spec(sample))
                chunks = self.service.chunks(plan.count, request.chunk_size)
                self._check_size(loaded, chunks[0][1], encoding, "use a smaller chunk_size")
                async for offset, result in self.service.results(loaded, plan, chunks, call_of(context)):
                    yield pb.SampleStreamResponse(chunk=await self._encoded(result, encoding, offset))

    async def Walk(self, request: pb.WalkRequest, context: grpc.aio.ServicerContext) -> pb.WalkResponse:
        async with self._rpc("Walk", request.model, context):
            with self.service.admitted(), self.service.use(request.model, request.version) as loaded:
                encoding = codec.resolve_encoding(request.encoding, loaded.manifest)
                z, labels = await self.service.draw_walk(
                    loaded.manifest, codec.endpoint(request.start, "start"), codec.endpoint(request.end, "end"),
                    request.steps, codec.interpolation(request.interpolation), codec.optional(request, "truncation"))
                self._check_size(loaded, len(z), encoding, "ask for fewer steps")
                result = await self.service.sample(loaded, z, 0, request.include_scores, call_of(context), labels)
                return pb.WalkResponse(frames=await self._encoded(result, encoding, 0))

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async with self._rpc("Score", request.model, context):
            with self.service.admitted(), self.service.use(request.model, request.version) as loaded:
                limit = self.service.config.max_score_images
                if request.images:  # decoding PNG/JPEG takes milliseconds: keep it off the loop
                    inputs = await asyncio.to_thread(codec.score_inputs, request, loaded.manifest, limit)
                else:
                    inputs = codec.score_inputs(request, loaded.manifest, limit)
                result = await self.service.score(loaded, inputs, call_of(context), list(request.labels))
                return pb.ScoreResponse(model=result.manifest.name, version=result.manifest.version,
                                        probabilities=result.probabilities.tolist(),
                                        logits=result.logits.tolist(), provider=result.provider,
                                        labels=[] if result.labels is None else result.labels.tolist())

    def _model_info(self, entry: ModelEntry) -> pb.ModelInfo:
        info = pb.ModelInfo(name=entry.name)
        ready = entry.ready()
        info.latest_version = ready[-1] if ready else 0
        for version, state in sorted(entry.versions.items()):
            info.versions.append(pb.VersionInfo(
                version=version, state=VERSION_STATES.get(state.state, pb.VERSION_STATE_UNLOADED),
                provider=state.loaded.provider if state.loaded else "", error=state.error,
                manifest_json=state.manifest_json))
        manifests = [s.loaded.manifest for _, s in sorted(entry.versions.items()) if s.loaded]
        if manifests:
            latest = manifests[-1]
            info.kind, info.latent_size, info.num_classes = latest.kind, latest.latent_size, latest.num_classes
            info.sample_shape.extend(latest.sample_shape)
            info.class_names.extend(latest.class_names)
        else:
            for state in entry.versions.values():  # describe a failed model from its manifest, if readable
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    data = json.loads(state.manifest_json)
                    info.kind, info.latent_size = data["kind"], data["latent_size"]
        return info

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async with self._rpc("ListModels", "", context):
            return self._list_models()

    def _list_models(self) -> pb.ListModelsResponse:
        store = self.service.store
        return pb.ListModelsResponse(models=[self._model_info(e) for _, e in sorted(store.models().items())],
                                     default_model=store.default_model)

    async def ReloadModels(self, request: pb.ReloadModelsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ReloadModelsResponse:
        async with self._rpc("ReloadModels", "", context):
            await asyncio.to_thread(self.reload)  # loading and warming models takes seconds
            listing = self._list_models()
            return pb.ReloadModelsResponse(models=listing.models, default_model=listing.default_model)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        async with self._rpc("GetModel", request.model, context):
            return pb.GetModelResponse(model=self._model_info(self.service.store.entry(request.model)))
