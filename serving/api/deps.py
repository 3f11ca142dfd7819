"""Injected dependencies: the service, and one :class:`Principal` per request.

Every route but health and readiness needs ``Authorization: Bearer <key>``; the key's
role is checked against the action (``serving.states.ALLOWED``) and what the request did
is noted for the access log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from serving.core import TwinService
from serving.errors import Forbidden, NotReady, Unauthorized
from serving.states import Action, may
from serving.store.keys import REVOKED
from serving.writes import AccessInfo, Caller

bearer = HTTPBearer(auto_error=False, description="a twincast API key (tc_…)")
Principal = Caller  # who is asking: key name, key id, role
M = TypeVar("M", bound=BaseModel)


async def get_service(request: Request) -> TwinService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the service is starting")
    return service


Service = Annotated[TwinService, Depends(get_service)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def note_access(request: Request, action: str, subject_id: int | None = None) -> None:
    request.state.access = {"action": action, "caller": None, "subject_id": subject_id,
                            "info": None}


def authenticate(service: TwinService, credentials: HTTPAuthorizationCredentials | None,
                 *, remembered: bool = False) -> Principal:
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("missing 'Authorization: Bearer <key>' header")
    token = credentials.credentials.strip()
    keys = service.store.keys
    key = keys.recall(token) if remembered else keys.authenticate(token)
    if key is None:
        raise Unauthorized(REVOKED)
    return Principal(key.name, key.id, key.role, confirm=remembered)


def authorize(request: Request, service: TwinService,
              credentials: HTTPAuthorizationCredentials | None, action: Action, name: str,
              *, twin: bool = False, remembered: bool = False) -> Principal:
    """Authenticate, check the role may do ``action`` and note the access (``name`` in
    the access log; the path's twin when ``twin``).  Blocking (one indexed read): call it
    off the event loop.  ``remembered``: the key as this worker last found it, which the
    route's transaction confirms (see :func:`acting_for`)."""
    subject = str(request.path_params.get("subject_id", ""))
    note_access(request, name, int(subject) if twin and subject.isdigit()
                and int(subject) < 2**63 else None)
    principal = authenticate(service, credentials, remembered=remembered)
    request.state.access["caller"] = principal
    if not may(principal.role, action):
        _vouch(request, service, principal)
        raise Forbidden(f"role '{principal.role}' may not {action.value}")
    return principal


@contextlib.contextmanager
def acting_for(request: Request, service: TwinService,
               credentials: HTTPAuthorizationCredentials | None, action: Action, name: str,
               *, twin: bool = False) -> Iterator[Principal]:
    """:func:`authorize` with the key as this worker remembers it, for a route whose one
    transaction confirms it (``Caller.confirm``): no read of its own.  Any other answer
    than the route's own (a bad body, a missing twin, a busy database) is given only to
    a key read again and found active; a revoked one gets the 401 a fresh read would
    have given, and a key that cannot be read again is logged as no one's."""
    caller = authorize(request, service, credentials, action, name, twin=twin,
                       remembered=True)
    try:
        yield caller
    except Unauthorized:
        request.state.access["caller"] = None  # logged as any refused key is
        raise
    except Exception:
        try:
            _vouch(request, service, caller)
        except Unauthorized:
            raise
        except Exception:  # the store cannot say: the original error stands, unattributed
            request.state.access["caller"] = None
        raise


def _vouch(request: Request, service: TwinService, caller: Principal) -> None:
    """A remembered key read again before a refusal is told (401 when revoked)."""
    if caller.confirm and caller.key_id is not None \
            and not service.store.keys.is_active(caller.key_id):
        service.store.keys.forget([caller.key_id])
        request.state.access["caller"] = None
        raise Unauthorized(REVOKED)


def require(action: Action, name: str, *, twin: bool = False):
    r"""A dependency that :func:`authorize`\ s the request."""

    def dependency(request: Request, service: Service,
                   credentials: Credentials) -> Principal:
        # a plain function: FastAPI runs it in the thread pool, off the event loop
        return authorize(request, service, credentials, action, name, twin=twin)

    return dependency


def parse_body(model: type[M], raw: bytes) -> M:
    """A JSON body read by hand, validated as FastAPI would (422, locations under
    ``body``, values never echoed)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in
                                      exc.errors(include_input=False)]) from None


def access_of(request: Request) -> AccessInfo:
    """What the write path logs in its own transaction (the route's action); the
    middleware then logs the request only if the write did not."""
    info = AccessInfo(request.method, request.url.path, request.state.access["action"])
    request.state.access["info"] = info
    return info
