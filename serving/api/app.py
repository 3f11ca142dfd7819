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

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse

from serving.api import admin, errors, hooks, twins
from serving.api import schemas as S
from serving.api.deps import require
from serving.states import Action
from serving.store.access import access_row

LOGGED_ACTIONS = {"fhir_bundle", "bulk_events", "cds_call", "cds_feedback",
                  "stateless_forecast", "read_access_log", "reload", "audit_forecast"}
log = logging.getLogger("twincast.access")


class AccessLogMiddleware:
    """Pure ASGI: after a response, queue an access-log row for a request that touched a
    twin or did something auditable — unless its write already logged it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, _send)
        access = (scope.get("state") or {}).get("access")
        service = getattr(scope["app"].state, "service", None) if "app" in scope else None
        if not access or service is None:
            return
        info = access.get("info")
        if info is not None and info.written and 200 <= status["code"] < 300:
            return
        if access["subject_id"] is None and access["action"] not in LOGGED_ACTIONS:
            return
        caller = access.get("caller")
        try:
            service.store.access.queue(access_row(
                key_id=getattr(caller, "key_id", None), key_name=getattr(caller, "name", None),
                role=getattr(caller, "role", None), method=scope["method"],
                path=scope["path"], action=access["action"], subject_id=access["subject_id"],
                status_code=status["code"]))
        except Exception:
            log.exception("queueing an access-log row failed")


def create_app(*, open_docs: bool = False) -> FastAPI:
    app = FastAPI(title="twincast", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Digital twins with live, traceable risk forecasts.")
    errors.install(app)
    app.add_middleware(AccessLogMiddleware)
    for r in (twins.router, hooks.router, admin.router):
        app.include_router(r)
    docs_guard = [] if open_docs else [Depends(require(Action.READ_TWINS, "read_docs"))]

    @app.get("/v1/openapi.json", include_in_schema=False, dependencies=docs_guard)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/docs", include_in_schema=False, dependencies=docs_guard)
    def docs():
        return get_swagger_ui_html(openapi_url="/v1/openapi.json", title="twincast API")

    @app.get("/v1/health", response_model=S.HealthOut, tags=["service"])
    def health() -> dict:
        """Liveness: the process answers (no key needed)."""
        return {"status": "ok"}

    @app.get("/v1/ready", response_model=S.HealthOut, tags=["service"],
             responses={503: {"model": S.HealthOut}})
    def ready(request: Request):
        """Readiness: the store answers and a model is loaded (no key needed)."""
        service = getattr(request.app.state, "service", None)
        checks = {"store": "missing", "model": "missing"}
        if service is not None:
            try:
                from sqlalchemy import text

                with service.store.read() as s:
                    s.execute(text("SELECT 1"))
                checks["store"] = "ok"
            except Exception as exc:
                checks["store"] = type(exc).__name__
            model = service.models.model
            if model is not None:
                checks["model"] = f"{model.name} version {model.version}"
        ok = checks["store"] == "ok" and checks["model"] != "missing"
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    # the bulk body is read by hand (its size first); document its schema all the same
    generate = app.openapi

    def openapi_with_bodies() -> dict[str, Any]:
        if app.openapi_schema is None:
            comps = generate().setdefault("components", {}).setdefault("schemas", {})
            schema = S.BulkIn.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(schema.pop("$defs", {}))
            comps["BulkIn"] = schema
        return app.openapi_schema

    app.openapi = openapi_with_bodies
    return app
