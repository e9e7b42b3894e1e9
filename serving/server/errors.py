"""Domain errors of the inference service; the servicer maps each to its gRPC status code."""

from __future__ import annotations

MAX_QUOTED = 64  # characters of a client-supplied name repeated in an error message
MAX_DETAILS = 2000  # characters of a status message (clients refuse metadata over 8 KiB)


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """``repr`` of a client-supplied string, shortened: an error must not echo 20 kB back."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def bounded(details: str, limit: int = MAX_DETAILS) -> str:
    """A status message cut to ``limit`` characters, whatever built it."""
    return details if len(details) <= limit else details[: limit - 3] + "..."


class ServiceError(Exception):
    """Base: ``code`` names the grpc.StatusCode the client receives."""

    code = "INTERNAL"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class Internal(ServiceError):
    code = "INTERNAL"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"
