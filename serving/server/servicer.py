"""The dcgan.v1 gRPC servicer (grpc.aio): translates protobuf requests to InferenceService calls
and the results back, nothing else.

Handlers run on the server's event loop and must not block it: waiting for the model is awaited,
and the work that takes milliseconds per call (PNG encoding, reloading models) runs in a worker
thread (the service does the same for decoding and latent redraws).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import grpc
from dcgan.v1 import inference_pb2 as pb
from dcgan.v1 import inference_pb2_grpc as pb_grpc

from serving.server import codec
from serving.server.service import Call, InferenceService, SampleResult

NO_DEADLINE_S = 10**7  # grpc reports "no deadline" as an enormous time_remaining()


def call_of(context: grpc.aio.ServicerContext) -> Call:
    remaining = context.time_remaining()
    deadline = None if remaining is None or remaining > NO_DEADLINE_S else time.monotonic() + remaining
    ended = threading.Event()  # read by the batcher's thread: set once the RPC is over (e.g. cancelled)
    context.add_done_callback(lambda _: ended.set())
    return Call(deadline, lambda: not ended.is_set())


async def _encoded(result: SampleResult) -> pb.SampleResponse:
    if result.encoding == "png":
        return await asyncio.to_thread(codec.sample_response, result)
    return codec.sample_response(result)


@contextlib.asynccontextmanager
async def handled(service: InferenceService, method: str, model: str,
                  context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Count and time a call of any front end; an error becomes the gRPC status codec.status
    names (never grpc's UNKNOWN). The call is counted before the status goes out, so a client that
    has its answer can already see it in the metrics."""
    start, code, details = time.perf_counter(), "OK", ""
    try:
        yield
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception as exc:  # noqa: BLE001 - every error gets a status, the unexpected ones INTERNAL
        code, details = codec.status(exc, method)
    finally:
        service.record_call(method, model, code, time.perf_counter() - start)
    if code != "OK":
        await context.abort(getattr(grpc.StatusCode, code), details)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, service: InferenceService):
        self.service = service

    def _rpc(self, method: str, model: str, context: grpc.aio.ServicerContext):
        return handled(self.service, method, model, context)

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        async with self._rpc("Sample", request.model, context):
            return await _encoded(await self.service.sample(codec.sample_spec(request), call_of(context)))

    async def SampleStream(self, request: pb.SampleStreamRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SampleStreamResponse]:
        async with self._rpc("SampleStream", request.sample.model, context):
            parts = self.service.stream(codec.sample_spec(request.sample), request.chunk_size, call_of(context))
            async for part in parts:
                yield pb.SampleStreamResponse(chunk=await _encoded(part))

    async def Walk(self, request: pb.WalkRequest, context: grpc.aio.ServicerContext) -> pb.WalkResponse:
        async with self._rpc("Walk", request.model, context):
            frames = await self.service.walk(codec.walk_spec(request), call_of(context))
            return pb.WalkResponse(frames=await _encoded(frames))

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async with self._rpc("Score", request.model, context):
            return codec.score_response(await self.service.score(codec.score_spec(request), call_of(context)))

    async def Project(self, request: pb.ProjectRequest, context: grpc.aio.ServicerContext) -> pb.ProjectResponse:
        async with self._rpc("Project", request.model, context):
            spec, encoding = codec.project_spec(request)
            result = await self.service.project(spec, encoding, call_of(context))
            return await asyncio.to_thread(codec.project_response, result)

    async def Translate(self, request: pb.TranslateRequest,
                        context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        async with self._rpc("Translate", request.model, context):
            spec, encoding = codec.translate_spec(request)
            result = await self.service.translate(spec, encoding, request.include_scores, call_of(context))
            return await asyncio.to_thread(codec.translate_response, result)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async with self._rpc("ListModels", "", context):
            cards, default = self.service.models()
            return pb.ListModelsResponse(models=[codec.model_info(c) for c in cards], default_model=default)

    async def ReloadModels(self, request: pb.ReloadModelsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ReloadModelsResponse:
        async with self._rpc("ReloadModels", "", context):
            cards, default = await asyncio.to_thread(self.service.reload)  # loading models takes seconds
            return pb.ReloadModelsResponse(models=[codec.model_info(c) for c in cards], default_model=default)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        async with self._rpc("GetModel", request.model, context):
            return pb.GetModelResponse(model=codec.model_info(self.service.model(request.model)))
