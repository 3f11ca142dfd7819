"""The FastAPI app, built by a factory with no I/O: routers per area over
:class:`~serving.core.TwinService` (set on ``app.state.service`` once a worker starts).

Every route but health and readiness needs ``Authorization: Bearer <key>`` with a role:
``clinical`` (twin writes and reads, stateless forecast), ``auditor`` (read-only: twins,
forecasts, model, access log, audit) or ``admin`` (everything) — ``serving.states``.
Requests that touch a twin are in the access log (who, what, when; never a value).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.routing import Match, Route

from serving.api import admin, errors, hooks, twins
from serving.api import schemas as S
from serving.api.deps import require
from serving.api.limits import BodyLimitMiddleware
from serving.runtime import BENTO_PATHS
from serving.states import Action
from serving.store.access import access_row

LOGGED_ACTIONS = {"fhir_bundle", "bulk_events", "cds_call", "cds_feedback", "read_monitoring",
                  "stateless_forecast", "read_access_log", "reload", "audit_forecast"}
log = logging.getLogger("twincast.access")


class AccessLogMiddleware:
    """Pure ASGI: the access-log row of a request that touched a twin or did something
    auditable, unless its write already logged it in its own transaction.

    A successful answer is held until its row is committed (a worker killed after it
    answered leaves the row behind); when the row cannot be written the client gets a
    503 instead of the data.  Refusals (4xx) are queued and written in batches, so
    unauthenticated traffic costs no write each."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = False

        async def _send(message):
            nonlocal refused
            if message["type"] == "http.response.start":
                row, service = self._row(scope, message["status"])
                if row is not None and 200 <= message["status"] < 300:
                    try:
                        await anyio.to_thread.run_sync(service.store.access.write, row)
                    except Exception as exc:
                        log.error("writing an access-log row failed (%s): answered 503",
                                  type(exc).__name__)
                        refused = True
                        await errors.error(
                            503, "unavailable", "the access log could not be written: try "
                            "again shortly", headers={"Retry-After": "1"})(scope, receive,
                                                                           send)
                        return
                elif row is not None:
                    service.store.access.queue(row)
            if not refused:
                await send(message)

        await self.app(scope, receive, _send)

    @staticmethod
    def _row(scope, status: int) -> tuple[dict[str, Any] | None, Any]:
        access = (scope.get("state") or {}).get("access")
        service = getattr(scope["app"].state, "service", None) if "app" in scope else None
        if not access or service is None:
            return None, None
        info = access.get("info")
        if info is not None and info.written and 200 <= status < 300:
            return None, None
        if access["subject_id"] is None and access["action"] not in LOGGED_ACTIONS:
            return None, None
        caller = access.get("caller")
        return access_row(
            key_id=getattr(caller, "key_id", None), key_name=getattr(caller, "name", None),
            role=getattr(caller, "role", None), method=scope["method"], path=scope["path"],
            action=access["action"], subject_id=access["subject_id"], status_code=status,
            user_id=getattr(caller, "user_id", None)), service


READY_TIMEOUT_SECONDS = 2.0


def _store_check(service) -> str:
    from sqlalchemy import text

    try:
        with service.store.read() as s:
            s.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def _flat(routes) -> list[Route]:
    """Every route, inside included routers too (FastAPI wraps those)."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            out += _flat(inner.routes)
        elif isinstance(r, Route):
            out.append(r)
    return out


class Unmatched(Route):
    """The last route: a path no other route serves gets a JSON 404 — or, when the path
    exists for other methods, a JSON 405 with ``Allow`` — instead of BentoML's plain-text
    answer (BentoML hands the app only the paths one of its routes matches).  BentoML's
    own paths (metrics, probes) are left to BentoML."""

    def __init__(self, app: FastAPI):
        self._app = app
        super().__init__("/{path:path}", self._answer, include_in_schema=False,
                         methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])

    def matches(self, scope):
        if scope.get("type") == "http" and scope.get("path") in BENTO_PATHS:
            return Match.NONE, {}
        return super().matches(scope)

    async def _answer(self, request: Request):
        if request.url.path == "/ui" or request.url.path.startswith("/ui/"):
            from serving.ui.pages import not_found_page  # the pages answer as pages

            return not_found_page(request)
        allowed = sorted({m for r in _flat(self._app.router.routes) if r is not self
                          and r.path_regex.match(request.url.path) for m in (r.methods or ())})
        if allowed:
            return errors.error(405, "method_not_allowed", f"{request.method} is not "
                                f"allowed here: use {', '.join(allowed)}",
                                headers={"Allow": ", ".join(allowed)})
        return errors.error(404, "not_found", "no such route")


def create_app(*, open_docs: bool = False) -> FastAPI:
    app = FastAPI(title="twincast", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Digital twins with live, traceable risk forecasts.")
    errors.install(app)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(BodyLimitMiddleware)  # outermost: before anything reads the body
    from serving.ui import pages  # the care team's pages (/ui)

    for r in (twins.router, hooks.router, admin.router, pages.router):
        app.include_router(r)
    docs_guard = [] if open_docs else [Depends(require(Action.READ_TWINS, "read_docs"))]

    @app.get("/v1/openapi.json", include_in_schema=False, dependencies=docs_guard)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/docs", include_in_schema=False, dependencies=docs_guard)
    def docs():
        return get_swagger_ui_html(openapi_url="/v1/openapi.json", title="twincast API")

    @app.get("/v1/health", response_model=S.HealthOut, tags=["service"])
    async def health() -> dict:
        """Liveness: the process answers (no key needed; on the event loop, so it answers
        whatever the database does)."""
        return {"status": "ok"}

    @app.get("/v1/ready", response_model=S.HealthOut, tags=["service"],
             responses={503: {"model": S.HealthOut}})
    async def ready(request: Request):
        """Readiness: the store answers (within 2 s) and a model is loaded; each
        dependency's state is named (no key needed)."""
        service = getattr(request.app.state, "service", None)
        checks = {"store": "missing", "model": "missing"}
        if service is not None:
            checks["registry"] = service.registry_state
            checks["store"] = "timeout"
            with anyio.move_on_after(READY_TIMEOUT_SECONDS):
                checks["store"] = await anyio.to_thread.run_sync(_store_check, service,
                                                                 abandon_on_cancel=True)
            model = service.models.model
            if model is not None:
                checks["model"] = f"{model.name} version {model.version}"
        ok = checks["store"] == "ok" and checks["model"] != "missing"
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    # bodies read by hand (the bulk route's size first; the events route in its one
    # hop off the event loop): document their schemas all the same
    generate = app.openapi

    def openapi_with_bodies() -> dict[str, Any]:
        if app.openapi_schema is None:
            comps = generate().setdefault("components", {}).setdefault("schemas", {})
            for model in (S.BulkIn, S.EventsIn):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(schema.pop("$defs", {}))
                comps[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi_with_bodies
    app.router.routes.append(Unmatched(app))
    return app
