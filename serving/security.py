"""Transport security and authentication for the server and its clients.

TLS: server certificate and key (PEM), clients trust a CA file. Authentication: a bearer token
in the ``authorization`` metadata; calls without it get UNAUTHENTICATED. The health service stays
open so that load balancers and container probes need no token.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from serving.server.config import ServeConfigError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def read_token(path: str) -> str:
    """The bearer token in ``path``; an empty, unreadable or non-ASCII file is refused, never
    taken as "no token" (which would let every caller in)."""
    try:
        token = Path(path).read_bytes().decode("ascii").strip()
    except OSError as exc:
        raise ServeConfigError(f"auth_token_file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ServeConfigError(f"auth_token_file {path} must hold an ASCII token (it goes in gRPC metadata)") from None
    if not token:
        raise ServeConfigError(f"auth_token_file {path} is empty: put the token clients must send in it")
    if any(not ch.isprintable() or ch.isspace() for ch in token):
        raise ServeConfigError(f"auth_token_file {path} must hold one token on one line, without spaces")
    return token


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def channel(target: str, options: list, ca: str | None = None, token: str | None = None) -> grpc.Channel:
    """An insecure channel, or TLS (trusting ``ca``) with the token sent on every call."""
    if ca is None:
        if token is not None:
            raise ValueError("a bearer token needs TLS: pass the CA of the server's certificate too")
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes())
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=options)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls (other than health checks) whose bearer token is missing or wrong."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty bearer token would admit every caller")
        self._token = token.encode()

        async def deny(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token "
                          "(send metadata 'authorization: Bearer <token>')")

        self._deny = {kind: handler(deny) for kind, handler in [
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler)]}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        scheme, _, supplied = dict(details.invocation_metadata or ()).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(supplied.encode(), self._token):
            return await continuation(details)
        handler = await continuation(details)
        streaming = handler is not None and handler.response_streaming
        return self._deny["unary_stream" if streaming else "unary_unary"]
