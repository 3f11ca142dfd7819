"""The FastAPI app (built by a factory, no I/O): thin routes over :class:`TwinCore`.

Every route but health and readiness needs ``Authorization: Bearer <key>`` with a role:
``clinical`` (twin routes, stateless forecast), ``auditor`` (read-only: twins, forecasts,
model, access log) or ``admin`` (everything).  Requests that touch a twin are written to
the access log (who, what, when; never a clinical value).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.errors import FeaturesError
from serving.api import schemas as S
from serving.core import Caller, TwinCore
from serving.errors import (
    BadInput,
    Forbidden,
    NotFound,
    NotReady,
    ServingError,
    Unauthorized,
)

SubjectId = Annotated[int, Path(ge=0, le=2**63 - 1, description="The twin's MEDS subject_id")]
ERRORS = {401: {"model": S.ErrorOut, "description": "missing or unknown API key"},
          403: {"model": S.ErrorOut, "description": "the key's role may not do this"},
          422: {"model": S.ErrorOut, "description": "invalid input, with field-level messages"},
          503: {"model": S.ErrorOut, "description": "no model loaded yet"}}
NOT_FOUND = {404: {"model": S.ErrorOut, "description": "no such twin or forecast"}}

CLINICAL = ("clinical", "admin")
READERS = ("clinical", "auditor", "admin")
AUDIT = ("auditor", "admin")
ADMIN = ("admin",)


async def get_core(request: Request) -> TwinCore:
    core = getattr(request.app.state, "core", None)
    if core is None:
        raise NotReady("the service is starting")
    return core


Core = Annotated[TwinCore, Depends(get_core)]


def require(*roles: str, action: str, twin: bool = False):
    """A dependency: authenticate the bearer key, check its role, note the access."""

    async def dependency(request: Request, core: Core) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        subject = str(request.path_params.get("subject_id", ""))
        valid = twin and subject.isdigit() and int(subject) < 2**63
        request.state.access = {"action": action, "key": None,
                                "subject_id": int(subject) if valid else None}
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing 'Authorization: Bearer <key>' header")
        key = core.store.authenticate(token.strip())
        if key is None:
            raise Unauthorized("unknown or revoked API key")
        request.state.access["key"] = key
        if key.role not in roles:
            raise Forbidden(f"role '{key.role}' may not {action.replace('_', ' ')}")
        return Caller(key)

    return dependency


class AccessLogMiddleware:
    """Pure ASGI: after a response, queue an access-log row for requests that touched a
    twin (or did something auditable), with the status code that was sent."""

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
        state = scope.get("state") or {}
        access = state.get("access")
        core = getattr(scope["app"].state, "core", None) if "app" in scope else None
        if access and core is not None and (access["subject_id"] is not None
                                            or access["action"] in LOGGED_ACTIONS):
            try:  # queued for the batch writer: no database round trip on the hot path
                core.store.log_access(
                    None, key=access["key"], method=scope["method"], path=scope["path"],
                    action=access["action"], subject_id=access["subject_id"],
                    status_code=status["code"])
            except Exception:
                logging.getLogger("twincast.access").exception("writing the access log failed")


def require_cds(action: str):
    """CDS Hooks auth: a JWT from a registered CDS client, or a twincast clinical key."""

    async def dependency(request: Request, core: Core) -> tuple[Caller, str]:
        from serving.cds import verify_jwt

        request.state.access = {"action": action, "key": None, "subject_id": None}
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing 'Authorization: Bearer <JWT or key>' header")
        if token.startswith("tc_"):
            key = core.store.authenticate(token)
            if key is None:
                raise Unauthorized("unknown or revoked API key")
            request.state.access["key"] = key
            if key.role not in CLINICAL:
                raise Forbidden(f"role '{key.role}' may not call CDS services")
            return Caller(key), f"key:{key.name}"
        url = str(request.url).split("?")[0]
        audiences = [url, url.rsplit("/feedback", 1)[0], str(request.base_url) + "cds-services"]
        client = verify_jwt(token, core.cds_clients, audiences)
        from types import SimpleNamespace

        # CDS clients act as the clinical role; their name goes to the access log
        pseudo = SimpleNamespace(id=None, name=client.name, role="clinical")
        request.state.access["key"] = pseudo
        return Caller(pseudo), client.issuer

    return dependency


def _error(status: int, code: str, message: str, fields: list | None = None) -> JSONResponse:
    body = {"error": code, "message": message, "fields": fields or []}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(*, open_docs: bool = False) -> FastAPI:
    app = FastAPI(title="twincast", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Digital twins with live, traceable risk forecasts.")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # field-level messages; the submitted values are never echoed back
        fields = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return _error(422, "invalid_input", "the request does not validate", fields)

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError):
        fields = [{"loc": exc.field, "msg": str(exc)}] if getattr(exc, "field", None) else []
        return _error(exc.http_status, exc.code, str(exc), fields)

    @app.exception_handler(FeaturesError)
    async def _features(request: Request, exc: FeaturesError):
        return _error(422, "invalid_input", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail))

    app.add_middleware(AccessLogMiddleware)

    docs_guard = [] if open_docs else [Depends(require(*READERS, action="read_docs"))]

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
        core = getattr(request.app.state, "core", None)
        checks = {"store": "missing", "model": "missing"}
        if core is not None:
            try:
                from sqlalchemy import text

                with core.store.read() as s:
                    s.execute(text("SELECT 1"))
                checks["store"] = "ok"
            except Exception as exc:
                checks["store"] = type(exc).__name__
            if core.model is not None:
                checks["model"] = f"{core.model.name} version {core.model.version}"
        ok = checks["store"] == "ok" and core is not None and core.model is not None
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    @app.post("/v1/twins/{subject_id}/events", response_model=S.IngestOut, tags=["twins"],
              responses={**ERRORS})
    def ingest(subject_id: SubjectId, body: S.EventsIn, core: Core,
               caller: Annotated[Caller, Depends(require(*CLINICAL, action="ingest_events",
                                                         twin=True))]) -> dict:
        """Store new events for a twin (re-sent events are ignored) and return its new
        forecast, computed in the same transaction."""
        return core.ingest(subject_id, body.events, body.as_of, caller)

    @app.get("/v1/twins/{subject_id}", response_model=S.TwinOut, tags=["twins"],
             responses={**ERRORS, **NOT_FOUND})
    def get_twin(subject_id: SubjectId, core: Core,
                 _: Annotated[Caller, Depends(require(*READERS, action="read_twin",
                                                      twin=True))]) -> Response:
        """The twin's latest value per code and its current forecast."""
        return Response(core.twin(subject_id), media_type="application/json")

    @app.get("/v1/twins/{subject_id}/forecast", tags=["twins", "fhir"],
             responses={**ERRORS, **NOT_FOUND, 200: {
                 "description": "the current forecast: twincast JSON, or a FHIR R4 "
                                "RiskAssessment with ?format=fhir or "
                                "Accept: application/fhir+json"}})
    def current_forecast(request: Request, subject_id: SubjectId, core: Core,
                         _: Annotated[Caller, Depends(require(*READERS, action="read_forecast",
                                                              twin=True))],
                         format: Annotated[str | None, Query(pattern="^(json|fhir)$")] = None):
        """The twin's current forecast (as FHIR when asked)."""
        from serving.fhir import risk_assessment

        fhir = format == "fhir" or (format is None and "application/fhir+json" in
                                    request.headers.get("accept", ""))
        if fhir:
            return JSONResponse(risk_assessment(core, subject_id),
                                media_type="application/fhir+json")
        with core.store.read() as s:
            core.store.get_twin(s, subject_id)
            latest = core.store.latest_forecast(s, subject_id)
        if latest is None:
            raise NotFound(f"twin {subject_id} has no forecast yet")
        from serving.core import forecast_out

        return S.ForecastOut.model_validate(forecast_out(latest))

    @app.post("/v1/fhir", tags=["fhir"], response_model=S.FhirIngestOut, responses={**ERRORS})
    async def fhir_bundle(request: Request, core: Core,
                          caller: Annotated[Caller, Depends(require(*CLINICAL,
                                                                    action="fhir_bundle"))]):
        """A FHIR R4 Bundle (transaction or collection) of Patient, Observation, Condition
        and MedicationStatement/MedicationRequest: mapped to events, stored and forecast
        in one transaction.  Unmapped resources and codes are counted in the answer."""
        import json as _json

        import anyio

        from serving.fhir import ingest_bundle

        raw = await request.body()
        if len(raw) > MAX_BUNDLE_BYTES:
            raise BadInput(f"bundle larger than {MAX_BUNDLE_BYTES // 1_000_000} MB", ["body"])
        try:
            bundle = _json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadInput("the body is not JSON", ["body"]) from None
        return await anyio.to_thread.run_sync(ingest_bundle, core, bundle, caller)

    @app.get("/cds-services", tags=["cds-hooks"], responses={**ERRORS})
    def cds_discovery(core: Core, _: Annotated[tuple, Depends(require_cds("cds_discovery"))]
                      ) -> dict:
        """CDS Hooks discovery: the patient-view service and its prefetch templates."""
        from serving.cds import discovery

        return discovery(core)

    @app.post("/cds-services/{service_id}", tags=["cds-hooks"],
              responses={**ERRORS, **NOT_FOUND, 412: {"model": S.ErrorOut,
                                                      "description": "prefetch needed"}})
    async def cds_call(request: Request, service_id: str, core: Core,
                       auth: Annotated[tuple, Depends(require_cds("cds_call"))]) -> dict:
        """A patient-view hook call: update the twin from prefetch, forecast, answer cards."""
        import anyio

        from serving.cds import HOOK, call_service
        from serving.cds import service_id as our_id

        if service_id != our_id(core):
            raise NotFound(f"no CDS service {service_id!r}")
        try:
            body = await request.json()
        except ValueError:
            raise BadInput("the body is not JSON", ["body"]) from None
        if not isinstance(body, dict) or body.get("hook") != HOOK or not isinstance(
                body.get("hookInstance"), str) or not (body.get("context") or {}).get(
                "patientId"):
            raise BadInput("a patient-view request needs hook, hookInstance and "
                           "context.patientId", ["body"])
        caller, issuer = auth
        warning, critical = core.cds_thresholds
        out = await anyio.to_thread.run_sync(call_service, core, body, caller, issuer,
                                             warning, critical)
        request.state.access["subject_id"] = out["twincast"]["subject_id"]
        return out

    @app.post("/cds-services/{service_id}/feedback", tags=["cds-hooks"], responses={**ERRORS})
    async def cds_feedback(request: Request, service_id: str, core: Core,
                           auth: Annotated[tuple, Depends(require_cds("cds_feedback"))]
                           ) -> dict:
        """Card feedback (accepted or overridden), kept for auditors."""
        from serving.cds import store_feedback

        try:
            body = await request.json()
        except ValueError:
            raise BadInput("the body is not JSON", ["body"]) from None
        return {"stored": store_feedback(core, service_id, body, auth[0].name)}

    @app.get("/v1/twins/{subject_id}/forecasts", response_model=S.ForecastPage, tags=["twins"],
             responses={**ERRORS, **NOT_FOUND})
    def list_forecasts(subject_id: SubjectId, core: Core,
                       _: Annotated[Caller, Depends(require(*READERS, action="read_forecasts",
                                                            twin=True))],
                       limit: Annotated[int, Query(ge=1, le=500)] = 50,
                       offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        """The twin's forecast history, newest first."""
        return core.forecasts(subject_id, limit, offset)

    @app.post("/v1/forecast", response_model=S.ForecastOut, tags=["forecasts"],
              responses={**ERRORS})
    def stateless(body: S.StatelessIn, core: Core,
                  _: Annotated[Caller, Depends(require(*CLINICAL, action="stateless_forecast"))]
                  ) -> dict:
        """A forecast from a supplied history; nothing is stored."""
        return core.stateless(body.subject_id, body.events, body.as_of)

    @app.get("/v1/model", response_model=S.ModelOut, tags=["model"], responses={**ERRORS})
    def model(core: Core, _: Annotated[Caller, Depends(require(*READERS, action="read_model"))]
              ) -> dict:
        """The served model: name, version, run, digests, metrics, when it was loaded."""
        return core.model_info()

    @app.get("/v1/access-log", response_model=list[S.AccessOut], tags=["audit"],
             responses={**ERRORS})
    def access_log(core: Core,
                   _: Annotated[Caller, Depends(require(*AUDIT, action="read_access_log"))],
                   subject_id: Annotated[int | None, Query(ge=0)] = None,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list:
        """Who read or wrote which twin, when, through which key (names, never secrets)."""
        from serving.core import aware

        with core.store.read() as s:
            rows = core.store.access_log(s, subject_id, limit)
            return [{"time": aware(r.time), "key_name": r.key_name, "role": r.role,
                     "method": r.method, "path": r.path, "action": r.action,
                     "subject_id": r.subject_id, "status_code": r.status_code} for r in rows]

    @app.get("/v1/audit/forecasts/{forecast_id}", tags=["audit"],
             responses={**ERRORS, **NOT_FOUND})
    def audit(forecast_id: Annotated[str, Path(min_length=1, max_length=64)], core: Core,
              _: Annotated[Caller, Depends(require(*AUDIT, action="audit_forecast"))]) -> dict:
        """The chain behind one forecast — model version, run, data, digests, code — with
        every link verified, including reproducing the forecast bit for bit."""
        from serving.audit import audit_forecast

        with core.store.read() as s:
            row = core.store.forecast_by_id(s, forecast_id)
            task = row.model_name.removeprefix("twincast-")
        source = core.source if task == core.source.task_name else type(core.source)(
            core.source.tracker, task)
        return audit_forecast(core.store, source, forecast_id)

    @app.post("/v1/admin/reload", response_model=S.ReloadOut, tags=["admin"],
              responses={**ERRORS})
    def reload(core: Core, _: Annotated[Caller, Depends(require(*ADMIN, action="reload"))]
               ) -> dict:
        """Load the current champion; if it changed, re-forecast every twin (background)."""
        return core.reload(reason="admin reload")

    @app.get("/v1/admin/refresh", response_model=S.RefreshOut | None, tags=["admin"],
             responses={**ERRORS})
    def refresh(core: Core, _: Annotated[Caller, Depends(require(*ADMIN, action="refresh"))]):
        """Progress of the latest re-forecast job."""
        return core.refresh_status()

    return app


MAX_BUNDLE_BYTES = 20_000_000
LOGGED_ACTIONS = {"fhir_bundle", "cds_call", "cds_feedback", "stateless_forecast",
                  "read_access_log", "reload", "audit_forecast"}
