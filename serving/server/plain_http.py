"""The plain HTTP API, for people and scripts that want a picture or a number without a protocol:
model cards as JSON, a grid of samples as PNG, a walk as an animated GIF, uploaded images scored
as JSON, and an OpenAPI description at /openapi.json. Same service calls as every front end."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
from collections.abc import Awaitable, Callable

import numpy as np
from aiohttp import web
from PIL import Image

from dcgan_core import images
from serving.server.errors import InvalidArgument, NotFound, quoted
from serving.server.inputs import ScoreSpec
from serving.server.plans import Endpoint, SampleSpec, WalkSpec
from serving.server.service import Call, InferenceService, ModelCard, SampleResult, probabilities

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


def _scale(request: web.Request, default: int = images.GRID_SCALE) -> int:
    scale = query(request, "scale", int, default)
    if not 1 <= scale <= MAX_SCALE:
        raise InvalidArgument(f"scale = {scale} must be between 1 and {MAX_SCALE}")
    return scale


def _sample_spec(request: web.Request, model: str, **controls) -> SampleSpec:
    """The sampling query of sample.png and samples: count, seed, label, truncation, version."""
    label = query(request, "label", int)
    return SampleSpec(query(request, "count", int, 16), query(request, "seed", int), None,
                      () if label is None else (label,), query(request, "truncation", float), model=model,
                      version=query(request, "version", int, 0), encoding="float32", **controls)


def card_json(card: ModelCard) -> dict:
    return {**dataclasses.asdict(card),
            "versions": [{k: v for k, v in dataclasses.asdict(version).items() if k != "manifest_json"}
                         for version in card.versions]}


def png_bytes(image_chw: np.ndarray, scale: int) -> bytes:
    buffer = io.BytesIO()
    images.enlarge(images.to_pil(image_chw), scale).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(image_chw: np.ndarray, scale: int, headers: dict[str, str]) -> web.Response:
    return web.Response(body=png_bytes(image_chw, scale), content_type="image/png", headers=headers)


def pngs_base64(samples: np.ndarray, scale: int) -> list[str]:
    """Model-range samples as base64 PNGs (enlarged ``scale`` times) for JSON answers; milliseconds
    per image: call it off the event loop."""
    return [base64.b64encode(png_bytes(image, scale)).decode() for image in images.model_to_uint8(samples)]


class PlainRoutes:
    def __init__(self, service: InferenceService, counted: Counted):
        self.service, self.counted = service, counted

    def routes(self) -> list[web.RouteDef]:
        model = "/v1/models/{model}"
        return [web.get("/v1/models", self._models), web.get(f"{model}/manifest", self._manifest),
                web.get(f"{model}/sample.png", self._sample), web.get(f"{model}/samples", self._samples),
                web.get(f"{model}/walk.gif", self._walk), web.get(f"{model}/walk", self._walk_json),
                web.post(f"{model}/walk", self._walk_from_image), web.post(f"{model}/score", self._score),
                web.post(f"{model}/project", self._project), web.post(f"{model}/translate", self._translate),
                web.get("/openapi.json", self._openapi)]

    async def _models(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            cards, default = self.service.models()
            return web.json_response({"default_model": default, "models": [card_json(c) for c in cards]})
        return await self.counted("ListModels", "", work)

    async def _sample(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]

        async def work() -> web.Response:
            spec, scale = _sample_spec(request, model), _scale(request)
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

    async def _manifest(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]

        async def work() -> web.Response:
            card, version = self.service.model(model), query(request, "version", int, 0)
            version = version or card.latest_version
            found = [v.manifest_json for v in card.versions if v.version == version and v.manifest_json]
            if not found:
                raise NotFound(f"model {quoted(model)} has no version {version} with a readable manifest")
            return web.Response(text=found[0], content_type="application/json")
        return await self.counted("Manifest", model, work)

    async def _samples(self, request: web.Request) -> web.Response:
        """Samples as JSON, each a PNG with its index in the seed's sequence and P(real)."""
        model = request.match_info["model"]

        async def work() -> web.Response:
            spec = _sample_spec(request, model, min_score=query(request, "min_score", float),
                                keep_top=query(request, "keep_top", float), include_scores=True)
            scale = _scale(request)
            result = await self.service.sample(spec, call_of(request))
            return web.json_response({"model": model, "version": result.manifest.version, "seed": result.seed,
                                      "candidates": result.candidates,
                                      "samples": await asyncio.to_thread(_sample_items, result, scale)})
        return await self.counted("Samples", model, work)

    async def _walk_json(self, request: web.Request) -> web.Response:
        """A walk between two seeds' samples as JSON frames (PNGs)."""
        model = request.match_info["model"]

        async def work() -> web.Response:
            ends = [query(request, name, int) for name in ("from_seed", "to_seed")]
            if None in ends:
                raise InvalidArgument("a walk needs from_seed and to_seed")
            start = Endpoint(seed=ends[0], index=query(request, "from_index", int, 0))
            end = Endpoint(seed=ends[1], index=query(request, "to_index", int, 0))
            return await self._walk_frames(request, model, start, end, {})
        return await self.counted("Walk", model, work)

    async def _walk_from_image(self, request: web.Request) -> web.Response:
        """A walk from an uploaded image (its latent E(x), as Project finds it) to a seed's sample."""
        model = request.match_info["model"]

        async def work() -> web.Response:
            to_seed, version = query(request, "to_seed", int), query(request, "version", int, 0)
            if to_seed is None:
                raise InvalidArgument("a walk from an image needs to_seed")
            uploads = await _uploaded(request)
            if len(uploads) != 1:
                raise InvalidArgument(f"a walk starts from one image, not {len(uploads)}")
            found = await self.service.project(ScoreSpec(uploads, model=model, version=version), "float32",
                                               call_of(request))
            label = None if found.labels is None else int(found.labels[0])
            start = Endpoint(latent=found.latents[0], label=label)
            end = Endpoint(seed=to_seed, index=query(request, "to_index", int, 0), label=label)
            extra = {"anomaly": float(found.anomaly[0]), "anomaly_percentile": float(found.anomaly_percentile[0])}
            return await self._walk_frames(request, model, start, end, extra)
        return await self.counted("WalkFromImage", model, work)

    async def _walk_frames(self, request: web.Request, model: str, start: Endpoint, end: Endpoint,
                           extra: dict) -> web.Response:
        spec = WalkSpec(start, end, query(request, "steps", int, 16), model=model,
                        version=query(request, "version", int, 0), encoding="float32")
        scale = _scale(request)
        frames = await self.service.walk(spec, call_of(request))
        pngs = await asyncio.to_thread(pngs_base64, frames.samples, scale)
        return web.json_response({"model": model, "version": frames.manifest.version,
                                  "frames": [{"png": png} for png in pngs], **extra})

    async def _project(self, request: web.Request) -> web.Response:
        """Uploaded images' reconstructions G(E(x)) as PNGs, with their anomaly scores."""
        model = request.match_info["model"]

        async def work() -> web.Response:
            label, version = query(request, "label", int), query(request, "version", int, 0)
            spec = ScoreSpec(await _uploaded(request), None, () if label is None else (label,), model, version)
            scale = _scale(request)
            found = await self.service.project(spec, "float32", call_of(request))
            pngs = await asyncio.to_thread(pngs_base64, found.reconstructions, scale)
            answer = [{"reconstruction": png, "anomaly": float(found.anomaly[i]),
                       "anomaly_percentile": float(found.anomaly_percentile[i]),
                       **({} if found.labels is None else {"label": int(found.labels[i])})}
                      for i, png in enumerate(pngs)]
            return web.json_response({"model": model, "version": found.manifest.version, "images": answer})
        return await self.counted("ProjectImages", model, work)

    async def _translate(self, request: web.Request) -> web.Response:
        """Uploaded source images translated by a translation model, as base64 PNGs (enlarged
        ``scale`` times, default 1), with the discriminator's score of each pair when ``scores``."""
        model = request.match_info["model"]

        async def work() -> web.Response:
            version, scores = query(request, "version", int, 0), query(request, "scores", bool, False)
            scale = _scale(request, default=1)
            spec = ScoreSpec(await _uploaded(request), None, (), model, version)
            result = await self.service.translate(spec, "float32", scores, call_of(request))
            pngs = await asyncio.to_thread(pngs_base64, result.samples, scale)
            answer = [{"png": png, **({} if result.logits is None else {"score": float(result.probabilities[i]),
                                                                          "logit": float(result.logits[i])})}
                      for i, png in enumerate(pngs)]
            return web.json_response({"model": model, "version": result.manifest.version, "images": answer})
        return await self.counted("TranslateImages", model, work)

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


def _sample_items(result: SampleResult, scale: int) -> list[dict]:
    """Each sample of a result: its PNG, its index in the seed's sequence (a guided request's
    candidate index), P(real) and class when known."""
    indices = (result.candidate_indices if result.candidate_indices is not None
               else range(result.offset, result.offset + len(result.samples)))
    scores = None if result.logits is None else probabilities(result.logits)
    items = []
    for i, (png, index) in enumerate(zip(pngs_base64(result.samples, scale), indices)):
        item = {"index": int(index), "png": png}
        if scores is not None:
            item["score"] = float(scores[i])
        if result.labels is not None:
            item["label"] = int(result.labels[i])
        items.append(item)
    return items


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
        "/v1/models/{model}/manifest": {"get": {
            "summary": "a version's manifest (figures, training, files)",
            "parameters": [_MODEL, *_parameters("version")],
            "responses": {"200": {"description": "JSON"}, "404": _ERROR}}},
        "/v1/models/{model}/samples": {"get": {
            "summary": "samples as JSON: each a base64 PNG with its index in the seed's sequence, P(real), class",
            "parameters": [_MODEL, _TIMEOUT, *_parameters("count", "seed", "label", "truncation", "min_score",
                                                          "keep_top", "scale", "version")],
            "responses": {"200": {"description": "JSON: model, version, seed, candidates, samples"},
                          "400": _ERROR, "404": _ERROR, "504": _ERROR}}},
        "/v1/models/{model}/walk": {
            "get": {"summary": "a walk between two seeds' samples as JSON frames (base64 PNGs)",
                    "parameters": [_MODEL, _TIMEOUT, *_parameters("from_seed", "from_index", "to_seed", "to_index",
                                                                  "steps", "scale", "version")],
                    "responses": {"200": {"description": "JSON: frames"}, "400": _ERROR, "404": _ERROR}},
            "post": {"summary": "a walk from an uploaded image (its latent E(x)) to a seed's sample",
                     "parameters": [_MODEL, _TIMEOUT, *_parameters("to_seed", "to_index", "steps", "scale", "version")],
                     "requestBody": {"content": {"image/png": {}, "multipart/form-data": {}}},
                     "responses": {"200": {"description": "JSON: frames, anomaly, anomaly_percentile"},
                                   "400": _ERROR, "404": _ERROR}}},
        "/v1/models/{model}/project": {"post": {
            "summary": "uploaded images' reconstructions G(E(x)) as base64 PNGs, with anomaly scores",
            "parameters": [_MODEL, _TIMEOUT, *_parameters("label", "scale", "version")],
            "requestBody": {"content": {"image/png": {}, "multipart/form-data": {}}},
            "responses": {"200": {"description": "JSON: images (reconstruction, anomaly, anomaly_percentile[, label])"},
                          "400": _ERROR, "404": _ERROR, "504": _ERROR}}},
        "/v1/models/{model}/translate": {"post": {
            "summary": "uploaded source images translated by a translation model, as base64 PNGs",
            "parameters": [_MODEL, _TIMEOUT, *_parameters("scores", "scale", "version")],
            "requestBody": {"content": {"image/png": {}, "multipart/form-data": {}}},
            "responses": {"200": {"description": "JSON: images (png[, score, logit])"},
                          "400": _ERROR, "404": _ERROR, "504": _ERROR}}},
        "/v2/models/{model}/infer": {"post": {
            "summary": "Open Inference Protocol inference (KServe V2 REST; Triton's binary extension)",
            "parameters": [_MODEL, _TIMEOUT],
            "responses": {"200": {"description": "JSON or JSON + binary"}, "400": _ERROR, "504": _ERROR}}},
    },
}
