"""Twin routes: ingest (one twin or many), read, forecasts, the stateless forecast.

Each route parses, authorises, calls the service once and maps errors; answers are built
by ``serving.views`` (the shapes in ``schemas``) and sent as they are.
"""

from __future__ import annotations

import functools
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from serving.api import schemas as S
from serving.api.deps import (
    Credentials,
    Principal,
    Service,
    access_of,
    acting_for,
    parse_body,
    require,
)
from serving.api.responses import ERRORS, NOT_FOUND, TOO_LARGE, json_response
from serving.errors import BadInput, PayloadTooLarge
from serving.fhir import ingest_bundle, is_ndjson, ndjson_bundle, risk_assessment
from serving.states import Action
from serving.store.ids import ASSIGNED_MAX, CLIENT_ID_MAX
from serving.whatif import ScenarioEvent
from serving.writes import TwinInput

router = APIRouter(tags=["twins"])
WriteId = Annotated[int, Path(ge=0, le=CLIENT_ID_MAX, description=(
    "the twin's subject_id, chosen by the client (0 to 2**52 - 1)"))]
ReadId = Annotated[int, Path(ge=0, le=ASSIGNED_MAX, description="the twin's subject_id")]
# the same, checked by hand after the key (routes that authorise in their own hop off
# the event loop: a request without a valid key is 401 whatever its path)
RawWriteId = Annotated[str, Path(description=WriteId.__metadata__[0].description,
                                 json_schema_extra={"type": "integer", "minimum": 0,
                                                    "maximum": CLIENT_ID_MAX})]
RawReadId = Annotated[str, Path(description="the twin's subject_id",
                                json_schema_extra={"type": "integer", "minimum": 0,
                                                   "maximum": ASSIGNED_MAX})]


def twin_id(raw: str, high: int) -> int:
    """A path's twin id, checked as the ``Path`` bounds would (422, located)."""
    if raw.isdigit() and len(raw) <= 20 and int(raw) <= high:
        return int(raw)
    raise RequestValidationError([{
        "loc": ("path", "subject_id"), "type": "int_range",
        "msg": f"Input should be a whole number from 0 to {high}", "input": None}])


def body_of(schema: str) -> dict:
    """The OpenAPI request body of a route that reads its JSON body by hand (the schema
    is added to the components by ``serving.api.app``)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


@router.post("/v1/twins/{subject_id}/events", response_model=S.IngestOut,
             responses={**ERRORS}, openapi_extra=body_of("EventsIn"))
async def ingest(request: Request, subject_id: RawWriteId, service: Service,
                 credentials: Credentials) -> Response:
    """Store new events for a twin (re-sent events are ignored) and return its new
    forecast, computed in the same transaction."""
    raw = await request.body()  # capped before it was read

    def work() -> Response:  # one hop off the event loop: key, body, write, answer
        with acting_for(request, service, credentials, Action.WRITE_TWINS,
                        "ingest_events", twin=True) as caller:  # confirmed by the write
            sid = twin_id(subject_id, CLIENT_ID_MAX)
            body = parse_body(S.EventsIn, raw)
            inp = TwinInput(sid, events=[e.to_row() for e in body.events],
                            as_of=S.naive_utc(body.as_of), caller=caller,
                            access=access_of(request))
            out = service.coalescer.write(inp)  # batched with writes to other twins
        return json_response({"added": out.added, "duplicates": out.duplicates,
                              "forecast": out.forecast})

    return await anyio.to_thread.run_sync(work)


@router.post("/v1/twins:bulk", response_model=S.BulkOut, responses={**ERRORS, **TOO_LARGE},
             openapi_extra={"requestBody": {"required": True, "content": {
                 **body_of("BulkIn")["requestBody"]["content"],
                 "application/fhir+ndjson": {"schema": {
                     "type": "string", "description": "FHIR Bulk Data NDJSON lines, "
                     "Patients included (as POST /v1/fhir takes them)"}}}}})
async def bulk(request: Request, service: Service,
               caller: Annotated[Principal, Depends(require(Action.WRITE_TWINS,
                                                            "bulk_events"))]) -> Response:
    """Many twins' events in one request (at most ``max_bulk_twins`` twins and
    ``max_bulk_events`` events; 413 beyond): all stored and forecast in one transaction,
    or nothing.  Answers each twin's new forecast in brief.  With ``Content-Type:
    application/fhir+ndjson`` the body is FHIR Bulk Data lines, taken as ``POST /v1/fhir``
    takes them (patients by identifier; its limits)."""
    raw = await request.body()  # at most 64 MiB: capped before it was read
    if is_ndjson(request.headers.get("content-type")):
        bundle = await anyio.to_thread.run_sync(ndjson_bundle, raw)
        if not any(e.get("resource", {}).get("resourceType") == "Patient"
                   for e in bundle["entry"] if isinstance(e.get("resource"), dict)):
            raise BadInput("the NDJSON body has no Patient resource", ["body"])
        cfg = service.config
        fhir = await anyio.to_thread.run_sync(functools.partial(
            ingest_bundle, service, bundle, caller, access_of(request),
            max_events=cfg.max_bulk_events, max_patients=cfg.max_bulk_twins))
        pats = fhir["patients"]
        return json_response(bulk_answer(
            [(p["subject_id"], p["added"], p["duplicates"], p["created"], p["forecast"])
             for p in pats], report=fhir["report"]))
    body = parse_body(S.BulkIn, raw)
    n_events = sum(len(t.events) for t in body.twins)
    cfg = service.config
    if len(body.twins) > cfg.max_bulk_twins or n_events > cfg.max_bulk_events:
        raise PayloadTooLarge(f"{len(body.twins)} twins and {n_events} events: at most "
                              f"{cfg.max_bulk_twins} twins and {cfg.max_bulk_events} events "
                              "per request")
    inputs = [TwinInput(t.subject_id, events=[e.to_row() for e in t.events],
                        as_of=S.naive_utc(t.as_of)) for t in body.twins]
    outs = await anyio.to_thread.run_sync(service.writer.write, inputs, caller,
                                          access_of(request))
    return json_response(bulk_answer([(o.subject_id, o.added, o.duplicates, o.created,
                                       o.forecast) for o in outs]))


def bulk_answer(twins: list[tuple], report: dict | None = None) -> dict:
    """The bulk route's answer: each twin's new forecast in brief (subject id, added,
    duplicates, created, forecast), one model for all (one transaction)."""
    out = {"twins": [{"subject_id": sid, "added": added, "duplicates": dups,
                      "created": created, "forecast_id": fc["forecast_id"],
                      "status": fc["status"], "reason": fc["reason"], "as_of": fc["as_of"],
                      "risks": fc["risks"]} for sid, added, dups, created, fc in twins],
           "events_added": sum(t[1] for t in twins), "model": twins[0][4]["model"]}
    if report is not None:
        out["report"] = report
    return out


@router.get("/v1/twins", response_model=S.PopulationPage,
            responses={**ERRORS, **NOT_FOUND}, tags=["population"])
def population(request: Request, service: Service,
               caller: Annotated[Principal, Depends(require(Action.READ_TWINS,
                                                            "read_population"))],
               horizon_days: Annotated[int | None, Query(ge=1, le=36_500)] = None,
               sort: Annotated[str, Query(pattern="^(risk|rise|quiet)$")] = "risk",
               min_risk: Annotated[float | None, Query(ge=0, le=1)] = None,
               open_alert: bool = False,
               max_days_since_event: Annotated[int | None, Query(ge=0, le=36_500)] = None,
               expired: bool = False,
               limit: Annotated[int, Query(ge=1, le=200)] = 50,
               offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Response:
    """Twins at one horizon (default: the task's primary one), a page at a time: current
    forecasts by risk (``sort=risk``), by rise since the previous forecast (``rise``) or
    by time since the last event (``quiet``); ``expired=true``: the forecasts whose
    horizon has ended, which are never ranked.  Every twin listed is in the access
    log."""
    return json_response(service.population(
        horizon_days, sort=sort, min_risk=min_risk, open_alert=open_alert,
        max_quiet_days=max_days_since_event, expired=expired, limit=limit, offset=offset,
        caller=caller, access=access_of(request)))


@router.get("/v1/alerts", response_model=S.AlertPage, responses={**ERRORS},
            tags=["population"])
def list_alerts(request: Request, service: Service,
                caller: Annotated[Principal, Depends(require(Action.READ_TWINS,
                                                             "read_alerts"))],
                kind: Annotated[str, Query(pattern="^(alert|review)$")] = "alert",
                state: Annotated[str, Query(pattern="^(open|acknowledged|all)$")] = "open",
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Response:
    """Twin alerts, newest first: ``kind=alert`` (a twin's new forecast crossed its
    horizon's threshold) or ``review`` (the all-twin refresh after a model change did:
    queued for review); ``state=open`` leaves out acknowledged and expired ones.  Every
    twin listed is in the access log."""
    return json_response(service.alerts(kind=kind, state=state, limit=limit, offset=offset,
                                        caller=caller, access=access_of(request)))


@router.post("/v1/alerts/{alert_id}/acknowledge", response_model=S.AcknowledgeOut,
             responses={**ERRORS, **NOT_FOUND}, tags=["population"])
def acknowledge(request: Request, alert_id: Annotated[int, Path(ge=1, le=2**62)],
                body: S.AcknowledgeIn, service: Service,
                caller: Annotated[Principal, Depends(require(Action.WRITE_TWINS,
                                                             "acknowledge_alert"))]
                ) -> Response:
    """Acknowledge an alert (or mark a queued crossing reviewed) with a reason; who and
    when are recorded.  Once only (409 after)."""
    return json_response(service.acknowledge(alert_id, body.reason, caller,
                                             access_of(request)))


@router.get("/v1/twins/{subject_id}", response_model=S.TwinOut,
            responses={**ERRORS, **NOT_FOUND})
async def get_twin(request: Request, subject_id: RawReadId, service: Service,
                   credentials: Credentials) -> Response:
    """The twin's latest value per code and its current forecast."""
    def work() -> Response:  # one hop off the event loop: the key, then the view
        with acting_for(request, service, credentials, Action.READ_TWINS, "read_twin",
                        twin=True) as caller:  # confirmed by the read's transaction
            sid = twin_id(subject_id, ASSIGNED_MAX)
            view = service.twin_view(sid, caller, access_of(request))
        return Response(view, media_type="application/json")

    return await anyio.to_thread.run_sync(work)


@router.post("/v1/twins/{subject_id}/what-if", response_model=S.WhatIfOut,
             responses={**ERRORS, **NOT_FOUND})
def what_if(request: Request, subject_id: ReadId, body: S.WhatIfIn, service: Service,
            caller: Annotated[Principal, Depends(require(Action.WHAT_IF, "what_if",
                                                         twin=True))]) -> Response:
    """The twin's risks and trajectories under hypothetical events placed at one as-of
    time, beside its own at the same time, and their differences.  Stores no forecast
    and changes no twin.  **Associational**: a difference is what similar patients'
    records show, not the effect of a treatment (see ``interpretation_text``)."""
    events = [ScenarioEvent(e.code, e.numeric_value) for e in body.events]
    return json_response(service.what_if(subject_id, events, S.naive_utc(body.as_of), caller,
                                         access_of(request)))


@router.get("/v1/twins/{subject_id}/forecast", tags=["fhir"],
            responses={**ERRORS, **NOT_FOUND, 200: {
                "model": S.ForecastOut,
                "description": "the current forecast: twincast JSON, or a FHIR R4 "
                               "RiskAssessment with ?format=fhir or "
                               "Accept: application/fhir+json",
                "content": {"application/fhir+json": {}}}})
def current_forecast(request: Request, subject_id: ReadId, service: Service,
                     caller: Annotated[Principal, Depends(require(Action.READ_TWINS,
                                                                  "read_forecast", twin=True))],
                     format: Annotated[str | None, Query(pattern="^(json|fhir)$")] = None):
    """The twin's current forecast (as FHIR when asked)."""
    fhir = format == "fhir" or (format is None and "application/fhir+json" in
                                request.headers.get("accept", ""))
    if fhir:
        return JSONResponse(risk_assessment(service, subject_id),
                            media_type="application/fhir+json")
    return json_response(service.current_forecast(subject_id, caller, access_of(request)))


@router.get("/v1/twins/{subject_id}/forecasts", response_model=S.ForecastPage,
            responses={**ERRORS, **NOT_FOUND})
def list_forecasts(subject_id: ReadId, service: Service,
                   _: Annotated[Principal, Depends(require(Action.READ_TWINS,
                                                           "read_forecasts", twin=True))],
                   limit: Annotated[int, Query(ge=1, le=500)] = 50,
                   offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Response:
    """The twin's forecast history, newest first."""
    return json_response(service.forecasts(subject_id, limit, offset))


@router.post("/v1/forecast", response_model=S.ForecastOut, tags=["forecasts"],
             responses={**ERRORS})
def stateless(body: S.StatelessIn, service: Service,
              _: Annotated[Principal, Depends(require(Action.FORECAST,
                                                      "stateless_forecast"))]) -> Response:
    """A forecast from a supplied history, computed as a stored one is; nothing is
    stored."""
    return json_response(service.writer.stateless(
        body.subject_id, [e.to_row() for e in body.events], S.naive_utc(body.as_of)))
