"""Request bytes that do not parse as the request message get INVALID_ARGUMENT, not UNKNOWN.

grpc-aio deserializes a request before any handler runs and answers UNKNOWN when that fails. This
interceptor installs a deserializer that keeps the failure instead, and a handler in front of the
real one that answers it as the client's error, with the message type and protobuf's reason.
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


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        kind, factory = (("unary_stream", grpc.unary_stream_rpc_method_handler) if handler.response_streaming
                         else ("unary_unary", grpc.unary_unary_rpc_method_handler))
        return factory(_guarded(getattr(handler, kind), details.method),
                       request_deserializer=_lenient(handler.request_deserializer),
                       response_serializer=handler.response_serializer)
