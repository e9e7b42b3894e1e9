"""Domain errors of the inference service; the servicer maps each to its gRPC status code."""

from __future__ import annotations


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


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"
