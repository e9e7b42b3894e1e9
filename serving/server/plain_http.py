"""The plain HTTP API, for people and scripts that want a picture or a number without a protocol:
model cards as JSON, a grid of samples as PNG, a walk as an animated GIF, uploaded images scored
as JSON, and an OpenAPI description at /openapi.json. Same service calls as every front end."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Awaitable, Callable

import numpy as np
from aiohttp import web
from PIL import Image

from dcgan_core import images
from serving.server.errors import InvalidArgument, quoted
from serving.server.inputs import ScoreSpec
from serving.server.plans import Endpoint, SampleSpec, WalkSpec
from serving.server.service import Call, InferenceService, ModelCard

MAX_SCALE = 16
TIMEOUT_HEADER = "Request-Timeout-Ms"
Counted = Callable[[str, str, Callable[[], Awaitable[web.Response]]], Awaitable[web.Response]]


def query(request: web.Request, name: str, kind: type, default=None):
    """A query parameter as ``kind``; INVALID_ARGUMENT naming it when it does not parse."""
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise InvalidArgument(f"query parameter {name}={quoted(text)} must be true or false")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise InvalidArgument(f"query parameter {name}={quoted(text)} must be {expected}") from None


def call_of(request: web.Request) -> Call:
    """The service's view of an HTTP request: due within ``Request-Timeout-Ms`` when sent (HTTP has
    no deadline of its own; gRPC's is grpc-timeout), active while its connection is open."""
    text = request.headers.get(TIMEOUT_HEADER)
    call = Call(None, lambda: request.transport is not None and not request.transport.is_closing())
    if text is None:
        return call
    if not text.isdigit() or int(text) == 0:
        raise InvalidArgument(f"header {TIMEOUT_HEADER}: {quoted(text)} is not a positive number of milliseconds")
    return call.within(int(text) / 1000)


def _scale(request: web.Request) -> int:
    scale = query(request, "scale", int, images.GRID_SCALE)
    if not 1 <= scale <= MAX_SCALE:
        raise InvalidArgument(f"scale = {scale} must be between 1 and {MAX_SCALE}")
    return scale


def card_json(card: ModelCard) -> dict:
    return {**dataclasses.asdict(card),
            "versions": [{k: v for k, v in dataclasses.asdict(version).items() if k != "manifest_json"}
                         for version in card.versions]}


def picture(image_chw: np.ndarray, scale: int, headers: dict[str, str]) -> web.Response:
    buffer = io.BytesIO()
    images.enlarge(images.to_pil(image_chw), scale).save(buffer, format="PNG")
    return web.Response(body=buffer.getvalue(), content_type="image/png", headers=headers)


class PlainRoutes:
    def __init__(self, service: InferenceService, counted: Counted):
        self.service, self.counted = service, counted

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/models", self._models), web.get("/v1/models/{model}/sample.png", self._sample),
                web.get("/v1/models/{model}/walk.gif", self._walk), web.post("/v1/models/{model}/score", self._score),
                web.get("/openapi.json", self._openapi)]

    async def _models(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            cards, default = self.service.models()
            return web.json_response({"default_model": default, "models": [card_json(c) for c in cards]})
        return await self.counted("ListModels", "", work)

    async def _sample(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]

        async def work() -> web.Response:
            label = query(request, "label", int)
            spec = SampleSpec(query(request, "count", int, 16), query(request, "seed", int), None,
                              () if label is None else (label,), query(request, "truncation", float), model=model,
                              version=query(request, "version", int, 0), encoding="float32")
            scale = _scale(request)
            result = await self.service.sample(spec, call_of(request))
            grid = images.make_grid(images.model_to_uint8(result.samples))
            return picture(grid, scale, {"X-Seed": str(result.seed), "X-Model-Version": str(result.manifest.version)})
        return await self.counted("SamplePng", model, work)

    async def _walk(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]

        async def work() -> web.Response:
            ends = [query(request, name, int) for name in ("from_seed", "to_seed")]
            if None in ends:
                raise InvalidArgument("walk.gif needs from_seed and to_seed")
            spec = WalkSpec(Endpoint(seed=ends[0]), Endpoint(seed=ends[1]), query(request, "steps", int, 16),
                            model=model, version=query(request, "version", int, 0), encoding="float32")
            scale, frame_ms = _scale(request), query(request, "frame_ms", int, 80)
            if not 20 <= frame_ms <= 10000:
                raise InvalidArgument(f"frame_ms = {frame_ms} must be between 20 and 10000")
            frames = await self.service.walk(spec, call_of(request))
            gif = images.encode_gif(images.model_to_uint8(frames.samples), frame_ms, scale)
            return web.Response(body=gif, content_type="image/gif")
        return await self.counted("WalkGif", model, work)

    async def _score(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]

        async def work() -> web.Response:
            label, version = query(request, "label", int), query(request, "version", int, 0)
            anomaly = query(request, "anomaly", bool, False)
            spec = ScoreSpec(await _uploaded(request), None, () if label is None else (label,), model, version, anomaly)
            result = await self.service.score(spec, call_of(request))
            answer = {"model": model, "version": result.manifest.version,
                      "probabilities": result.probabilities.tolist(), "logits": result.logits.tolist()}
            for name in ("labels", "anomaly", "anomaly_percentile"):
                value = getattr(result, name)
                if value is not None:
                    answer[name] = value.tolist()
            return web.json_response(answer)
        return await self.counted("ScoreImages", model, work)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)


async def _uploaded(request: web.Request) -> list[bytes]:
    """The images of a score request: the body itself (one image), or each file of a multipart form."""
    if request.content_type.startswith("multipart/"):
        reader, files = await request.multipart(), []
        async for part in reader:
            files.append(await part.read(decode=False))
    else:
        files = [await request.read()]
    files = [f for f in files if f]
    if not files:
        raise InvalidArgument("send one image as the body, or image files in a multipart form")
    for number, data in enumerate(files):
        try:
            Image.open(io.BytesIO(data)).verify()
        except Exception:  # noqa: BLE001 - any failure to parse is the client's bad input
            raise InvalidArgument(f"upload {number} is not an image Pillow can read") from None
    return files


def _parameters(*names: str) -> list[dict]:
    return [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in names]


_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_TIMEOUT = {"name": TIMEOUT_HEADER, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 1},
            "description": "answer 504 if the call is not done within this many milliseconds"}
_ERROR = {"description": "a bad request or an unknown model: {\"error\": message}",
          "content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}}
OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "dcgan-serve HTTP API", "version": "1"},
    "paths": {
        "/v1/models": {"get": {"summary": "every model with its versions",
                               "responses": {"200": {"description": "JSON"}}}},
        "/v1/models/{model}/sample.png": {"get": {
            "summary": "a grid of samples",
            "parameters": [_MODEL, _TIMEOUT, *_parameters("count", "seed", "label", "truncation", "scale", "version")],
            "responses": {"200": {"description": "PNG; headers X-Seed, X-Model-Version"}, "400": _ERROR,
                          "404": _ERROR, "504": _ERROR}}},
        "/v1/models/{model}/walk.gif": {"get": {
            "summary": "an animated walk between two seeds", "parameters": [
                _MODEL, _TIMEOUT, *_parameters("from_seed", "to_seed", "steps", "frame_ms", "scale", "version")],
            "responses": {"200": {"description": "GIF"}, "400": _ERROR, "404": _ERROR, "504": _ERROR}}},
        "/v1/models/{model}/score": {"post": {
            "summary": "P(real) of uploaded images (one as the body, or a multipart form of files)",
            "parameters": [_MODEL, _TIMEOUT, *_parameters("label", "anomaly", "version")],
            "requestBody": {"content": {"image/png": {}, "multipart/form-data": {}}},
            "responses": {"200": {"description": "JSON: probabilities, logits [, labels, anomaly, anomaly_percentile]"},
                          "400": _ERROR, "404": _ERROR, "504": _ERROR}}},
        "/v2/models/{model}/infer": {"post": {
            "summary": "Open Inference Protocol inference (KServe V2 REST; Triton's binary extension)",
            "parameters": [_MODEL, _TIMEOUT],
            "responses": {"200": {"description": "JSON or JSON + binary"}, "400": _ERROR, "504": _ERROR}}},
    },
}
