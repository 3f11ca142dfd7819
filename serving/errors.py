"""Errors raised by ``serving``, each mapping to one HTTP status at the edge."""

from __future__ import annotations


class ServingError(Exception):
    http_status = 500
    code = "internal_error"


class NotFound(ServingError):
    http_status = 404
    code = "not_found"


class Unauthorized(ServingError):
    http_status = 401
    code = "unauthorized"


class Forbidden(ServingError):
    http_status = 403
    code = "forbidden"


class Conflict(ServingError):
    http_status = 409
    code = "conflict"


class NotReady(ServingError):
    http_status = 503
    code = "not_ready"


class BadInput(ServingError):
    http_status = 422
    code = "invalid_input"

    def __init__(self, message: str, field: list | None = None):
        super().__init__(message)
        self.field = field or []


class Unavailable(ServingError):
    """The database is busy (deadlocks retried) or unreachable: try again shortly."""

    http_status = 503
    code = "unavailable"
    retry_after = 1


class PayloadTooLarge(ServingError):
    http_status = 413
    code = "payload_too_large"

    def __init__(self, message: str, field: list | None = None):
        super().__init__(message)
        self.field = field or ["body"]


class ArtifactRefused(NotReady):
    """A model artifact whose SHA-256 is not the one recorded at registration."""

    code = "artifact_refused"
