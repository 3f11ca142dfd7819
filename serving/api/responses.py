"""Documented error answers and the JSON response the routes send as built."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from serving.api import schemas as S
from serving.views import dumps

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.ErrorOut, "description": "a body that cannot be read (not UTF-8 JSON) "
                                              "or a malformed Content-Length"},
    401: {"model": S.ErrorOut, "description": "missing or unknown API key"},
    403: {"model": S.ErrorOut, "description": "the key's role may not do this"},
    413: {"model": S.ErrorOut, "description": "a body larger than the route's limit"},
    409: {"model": S.ErrorOut, "description": "identifiers that belong to different twins"},
    422: {"model": S.ErrorOut, "description": "invalid input, with field-level messages"},
    503: {"model": S.ErrorOut, "description": "no model loaded yet, or the database is "
                                              "busy (see Retry-After)"}}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": S.ErrorOut, "description": "no such twin or forecast"}}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": S.ErrorOut, "description": "more twins, events or bytes than allowed"}}


def json_response(data: Any) -> Response:
    return Response(dumps(data), media_type="application/json")
