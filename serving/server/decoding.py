"""Request bytes that do not parse as the request message get INVALID_ARGUMENT, not UNKNOWN.

grpc-aio deserializes a request before any handler runs and answers UNKNOWN when that fails. Each
method handler is therefore registered with a deserializer that keeps the failure instead, and a
handler in front of the real one that answers it as the client's error, with the message type and
protobuf's reason. The wrapping happens once, when the servicers register (``GuardedRegistry``):
an interceptor would build a new handler on every call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

from serving.server.errors import bounded


class Undecodable:
    """Stands in for a request that failed to parse."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything a parser raises
            return Undecodable(exc)
    return parse


def _message(method: str, error: Exception) -> str:
    return bounded(f"request bytes of {method} do not parse as its request message: {error}")


def _guarded(behavior: Callable, method: str) -> Callable:
    """``behavior`` behind a check for an undecodable request; keeps its kind (coroutine or
    async generator), which grpc-aio looks at."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request.error))
            async for item in behavior(request, context):
                yield item
        return stream

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request.error))
        return await behavior(request, context)
    return unary


def guarded(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    """``handler`` with a lenient deserializer and the undecodable check in front (unary requests;
    others as they are)."""
    if handler is None or handler.request_streaming or handler.request_deserializer is None:
        return handler
    kind, factory = (("unary_stream", grpc.unary_stream_rpc_method_handler) if handler.response_streaming
                     else ("unary_unary", grpc.unary_unary_rpc_method_handler))
    return factory(_guarded(getattr(handler, kind), method),
                   request_deserializer=_lenient(handler.request_deserializer),
                   response_serializer=handler.response_serializer)


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler's answers, guarded once per method it serves (method names clients make
    up are answered None and never remembered: the table stays as small as the API)."""

    def __init__(self, inner: grpc.GenericRpcHandler):
        self._inner, self._handlers = inner, {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(details.method)
        if handler is None and (handler := guarded(self._inner.service(details), details.method)) is not None:
            self._handlers[details.method] = handler
        return handler


class GuardedRegistry:
    """Stands in for the server while generated ``add_*Servicer_to_server`` functions register:
    every method handler reaches the server guarded."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: guarded(handler, f"/{service}/{name}") for name, handler in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(handler) for handler in handlers))
