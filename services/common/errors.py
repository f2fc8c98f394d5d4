"""The one table: runtime error -> gRPC status code. User mistakes never become INTERNAL."""

from __future__ import annotations

import grpc

from runtime.errors import (
    ArtifactError,
    ConfigError,
    EdgeError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

STATUS_FOR_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),  # includes ContextOverflowError
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (EdgeError, grpc.StatusCode.INTERNAL),
]


class UpstreamError(EdgeError):
    """An upstream service's status, passed on unchanged (its message already says what to change)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def status_for(error: Exception) -> grpc.StatusCode:
    if isinstance(error, UpstreamError):
        return error.code
    for kind, code in STATUS_FOR_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
