"""The HTTP front end: the Open Inference Protocol's REST binding (KServe V2, with Triton's binary
tensor extension) and the plain API for people (serving.server.plain_http), on aiohttp, on the
gRPC server's own asyncio event loop.

Why aiohttp: it is asyncio-native, so the HTTP handlers await the same InferenceService
coroutines on the same loop as grpc.aio (no second loop, no thread hop, no ASGI layer), and it is
one well-kept dependency. The operations are serving.server.oip's, shared with the gRPC binding.
"""

from __future__ import annotations

import hmac
import json
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from aiohttp import web

from serving.server import codec, oip
from serving.server.errors import InvalidArgument, bounded
from serving.server.plain_http import PlainRoutes, call_of
from serving.server.service import InferenceService

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension: JSON first, then raw tensors
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNAUTHENTICATED": 401, "INTERNAL": 500}
OPEN_PATHS = ("/v2/health/", "/playground/")  # probes need no token, as gRPC health checks; nor the page
PLAYGROUND = Path(__file__).with_name("playground")  # the web playground's static files, served at /

Handler = Callable[[web.Request], Awaitable[web.Response]]


def error_response(code: str, message: str) -> web.Response:
    return web.json_response({"error": bounded(message)}, status=HTTP_STATUS.get(code, 500))


def _versioned(path: str) -> list[str]:
    """A model route with and without /versions/{version}."""
    return [f"/v2/models/{{name}}{path}", f"/v2/models/{{name}}/versions/{{version}}{path}"]


class HttpFront:
    """The routes, each counted in the service's metrics as ``http.<operation>``."""

    def __init__(self, service: InferenceService, token: str | None):
        self.service, self.token = service, token

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate], client_max_size=self.service.config.max_message_bytes)
        routes = [web.get("/v2/health/live", self._live), web.get("/v2/health/ready", self._ready),
                  web.get("/v2", self._server_metadata), web.post("/v2/repository/index", self._index)]
        routes += [web.get(path, self._metadata) for path in _versioned("")]
        routes += [web.get(path, self._model_ready) for path in _versioned("/ready")]
        routes += [web.post(path, self._infer) for path in _versioned("/infer")]
        app.add_routes(routes + PlainRoutes(self.service, self._counted).routes())
        app.router.add_get("/", self._playground)
        app.router.add_static("/playground/", PLAYGROUND)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is None or request.path == "/" or request.path.startswith(OPEN_PATHS):
            return await handler(request)
        scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(supplied.encode(), self.token.encode()):
            return await handler(request)
        return error_response("UNAUTHENTICATED", "missing or invalid bearer token (send the header "
                                                 "'Authorization: Bearer <token>')")

    async def _counted(self, operation: str, model: str, work: Callable[[], Awaitable[web.Response]]) -> web.Response:
        """Run ``work``; a service error becomes its HTTP status with a JSON ``error``."""
        start, code = time.perf_counter(), "OK"
        try:
            return await work()
        except Exception as exc:  # noqa: BLE001 - every error gets a status, the unexpected ones 500 (logged)
            code, message = codec.status(exc, f"http.{operation}")
            return error_response(code, message)
        finally:
            self.service.record_call(f"http.{operation}", model, code, time.perf_counter() - start)

    async def _playground(self, request: web.Request) -> web.FileResponse:
        """The web playground: a static page over the /v1 API (it sends the token itself)."""
        return web.FileResponse(PLAYGROUND / "index.html")

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = oip.server_ready(self.service)
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(oip.server_metadata())

    async def _metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")

        async def work() -> web.Response:
            return web.json_response(oip.model_metadata(self.service, name, version))
        return await self._counted("ModelMetadata", name, work)

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")

        async def work() -> web.Response:
            ready = oip.model_ready(self.service, name, version)
            return web.json_response({"name": name, "ready": ready}, status=200 if ready else 400)
        return await self._counted("ModelReady", name, work)

    async def _index(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            body = _json_body(await request.read()) if request.can_read_body else {}
            return web.json_response(oip.repository_index(self.service, bool(body.get("ready", False))))
        return await self._counted("RepositoryIndex", "", work)

    async def _infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")

        async def work() -> web.Response:
            header, arrays = decode_infer_request(await request.read(), request.headers.get(HEADER_LENGTH))
            result = await oip.infer(self.service, name, version, arrays, header.get("parameters", {}),
                                     call_of(request))
            return encode_infer_response(header, result)
        return await self._counted("ModelInfer", name, work)


def _json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def decode_infer_request(raw: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and each input as an array: from ``data`` or, with the binary extension,
    from the bytes after the header (``parameters.binary_data_size`` each, in input order)."""
    length = len(raw) if header_length is None else _header_length(header_length, len(raw))
    try:
        header = json.loads(raw[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the inference request is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs", []), list):
        raise InvalidArgument("the inference request must be a JSON object with a list of inputs")
    for key, (kind, word) in {"parameters": (dict, "object"), "outputs": (list, "list")}.items():
        if key in header and not isinstance(header[key], kind):
            raise InvalidArgument(f"the inference request's {key} must be a JSON {word}")
    arrays, offset = {}, length
    for tensor in header.get("inputs", []):
        name, array, offset = _input(tensor, raw, offset)
        if name in arrays:
            raise InvalidArgument(f"input {name!r} appears twice")
        arrays[name] = array
    if offset != len(raw):
        raise InvalidArgument(f"{len(raw) - offset} bytes after the last binary input")
    return header, arrays


def _header_length(text: str, body: int) -> int:
    if not text.isdigit() or int(text) > body:
        raise InvalidArgument(f"{HEADER_LENGTH} {text!r} is not a length within the {body}-byte body")
    return int(text)


def _input(tensor: object, raw: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One input of the JSON header: (name, array, offset after its binary data)."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise InvalidArgument("each input needs a name, a datatype and a shape")
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if datatype not in oip.DTYPES:
        raise InvalidArgument(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(oip.DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {shape!r} must be a list of sizes >= 0")
    dtype, count = np.dtype(oip.DTYPES[datatype]).newbyteorder("<"), math.prod(shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(raw):
            raise InvalidArgument(f"input {name!r}: binary_data_size {size} for shape {shape} of {datatype} "
                                  f"({len(raw) - offset} bytes left)")
        return name, np.frombuffer(raw, dtype, count, offset).reshape(shape).astype(dtype.newbyteorder("=")), \
            offset + size
    try:
        values = np.asarray(tensor.get("data"), dtype.newbyteorder("=")).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidArgument(f"input {name!r}: data is not a list of {datatype} numbers") from None
    if values.size != count:
        raise InvalidArgument(f"input {name!r}: {values.size} values for shape {shape}")
    return name, values.reshape(shape), offset


def encode_infer_response(header: dict, result: oip.InferResult) -> web.Response:
    """JSON outputs, or with the binary extension (an output's ``binary_data``, else the request's
    ``binary_data_output``) the JSON header followed by those outputs' raw bytes."""
    requested = {o.get("name"): o.get("parameters") or {} for o in header.get("outputs", []) if isinstance(o, dict)}
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs, chunks = [], []
    for name, array in result.selected(list(requested)).items():
        entry = {"name": name, "datatype": oip.DATATYPES[array.dtype], "shape": list(array.shape)}
        if requested.get(name, {}).get("binary_data", binary_default):
            chunks.append(oip.little_endian_bytes(array))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    body = {"model_name": result.target.name, "model_version": str(result.version), "outputs": outputs,
            "parameters": result.parameters, **({"id": header["id"]} if "id" in header else {})}
    text = json.dumps(body).encode()
    if not chunks:
        return web.Response(body=text, content_type="application/json")
    return web.Response(body=text + b"".join(chunks), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(text))})


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host``:``port``. The wildcard ``[::]`` (the default) takes IPv4 too, on
    the same port, as gRPC's does: asyncio would make it IPv6 only, and 127.0.0.1 would be refused.
    With ``reuse_port`` other processes may bind the same port (``--reuse-port``)."""
    host = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def start(service: InferenceService, token: str | None, host: str, port: int,
                tls: ssl.SSLContext | None, reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """Serve on the running loop; returns the runner (for cleanup) and the bound port."""
    sock = listening_socket(host, port, reuse_port)
    runner = web.AppRunner(HttpFront(service, token).app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=tls).start()
    return runner, sock.getsockname()[1]
