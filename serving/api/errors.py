"""Errors at the HTTP edge: every one a JSON body ``{error, message, fields}``.

Validation errors are 422 with field-level messages (values never echoed); twincast's
errors map to their own status; a database that is busy or unreachable is a 503 with
``Retry-After``.  No client input gives a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.errors import FeaturesError
from serving.errors import ServingError, Unavailable
from serving.store.db import is_retryable, is_unavailable
from training.errors import RegistryUnreachable

log = logging.getLogger("twincast.api")


def error(status: int, code: str, message: str, fields: list | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": code, "message": message, "fields": fields or []}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        fields = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return error(422, "invalid_input", "the request does not validate", fields)

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError):
        fields = [{"loc": exc.field, "msg": str(exc)}] if getattr(exc, "field", None) else []
        headers = ({"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable)
                   else None)
        return error(exc.http_status, exc.code, str(exc), fields, headers)

    @app.exception_handler(RegistryUnreachable)
    async def _registry(request: Request, exc: RegistryUnreachable):
        return error(503, "registry_unreachable", "the model registry does not answer: the "
                     "current model keeps serving; try again shortly",
                     headers={"Retry-After": "5"})

    @app.exception_handler(FeaturesError)
    async def _features(request: Request, exc: FeaturesError):
        return error(422, "invalid_input", str(exc))

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError):
        if isinstance(exc, DataError):  # a value the database refuses (a NUL byte, …)
            return error(422, "invalid_input", "a value in the request cannot be stored "
                         "(e.g. a NUL character)")
        if is_retryable(exc) or is_unavailable(exc):
            return error(503, "unavailable", "the database is busy or unreachable: try "
                         "again shortly", headers={"Retry-After": "1"})
        log.error("database error %s on %s", type(exc.orig).__name__, request.url.path)
        return error(503, "unavailable", "the request failed in the database: try again "
                     "shortly", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # a bug, not the client's mistake: JSON all the same, and the log names only the
        # exception's type and the route (never its message, which may carry values)
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method,
                  request.url.path)
        return error(500, "internal_error", "the request failed inside the service")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, "http_error", str(exc.detail),
                     headers=getattr(exc, "headers", None))
