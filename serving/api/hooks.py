"""FHIR bundles and CDS Hooks: adapters over the one write path."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request

from serving import cds
from serving.api import schemas as S
from serving.api.deps import Credentials, Principal, Service, access_of, note_access, require
from serving.api.responses import ERRORS, NOT_FOUND, TOO_LARGE, json_response
from serving.core import TwinService
from serving.errors import BadInput, Forbidden, NotFound, Unauthorized
from serving.fhir import ingest_bundle, is_ndjson, ndjson_bundle, parse_json
from serving.states import Action, may
from serving.store.keys import KEY_PREFIX
from serving.writes import Caller

router = APIRouter()
_BUNDLE = {
    "type": "object", "required": ["resourceType"],
    "description": "a FHIR R4 Bundle (transaction, batch or collection) of Patient, "
                   "Observation, Condition, MedicationStatement and MedicationRequest "
                   "resources.  FHIR's own rules (references, codes, units, dates) are "
                   "checked by the service: a bundle that breaks them is a 422 naming the "
                   "entry and element.",
    "properties": {
        "resourceType": {"type": "string", "enum": ["Bundle"]},
        "type": {"type": "string", "enum": ["transaction", "batch", "collection"]},
        "entry": {"type": "array", "maxItems": 50_000, "items": {
            "type": "object", "required": ["resource"],
            "properties": {"resource": {"type": "object", "required": ["resourceType"],
                                        "properties": {"resourceType": {"type": "string"}}}}}}}}
NDJSON = {"type": "string", "description": "FHIR Bulk Data NDJSON: one resource per line "
          "(Patients included; references as Patient/<id>), as a $export writes them"}
FHIR_BODY = {"requestBody": {"required": True, "content": {
    "application/fhir+json": {"schema": _BUNDLE}, "application/json": {"schema": _BUNDLE},
    "application/fhir+ndjson": {"schema": NDJSON}}}}
CDS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["hook", "hookInstance", "context"],
    "description": "a CDS Hooks 2.0 patient-view request; the prefetched Patient must be "
                   "context.patientId (else 422)",
    "properties": {
        "hook": {"type": "string", "enum": ["patient-view"]},
        "hookInstance": {"type": "string", "minLength": 1},
        "fhirServer": {"type": "string"},
        "context": {"type": "object", "required": ["patientId"], "properties": {
            "patientId": {"type": "string", "minLength": 1, "maxLength": 255},
            "userId": {"type": "string"}}},
        "prefetch": {"type": "object", "properties": {
            "patient": {"type": "object"}, "observations": {"type": "object"}}}}}}}}}
FEEDBACK_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "required": ["feedback"], "properties": {
        "feedback": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["card", "outcome"], "properties": {
                "card": {"type": "string"},
                "outcome": {"type": "string", "enum": ["accepted", "overridden"]},
                "overrideReason": {"type": "object"},
                "outcomeTimestamp": {"type": "string", "format": "date-time"}}}}}}}}}}


async def _body(request: Request) -> Any:
    """The body as JSON (its size was capped before it was read: serving.api.limits)."""
    return parse_json(await request.body())


async def fhir_body(request: Request) -> Any:
    """A bundle, or NDJSON lines (``Content-Type: application/fhir+ndjson``) as one."""
    raw = await request.body()
    if is_ndjson(request.headers.get("content-type")):
        return await anyio.to_thread.run_sync(ndjson_bundle, raw)
    return parse_json(raw)


@router.post("/v1/fhir", tags=["fhir"], response_model=S.FhirIngestOut,
             responses={**ERRORS, **TOO_LARGE}, openapi_extra=FHIR_BODY)
async def fhir_bundle(request: Request, service: Service,
                      caller: Annotated[Principal, Depends(require(Action.WRITE_TWINS,
                                                                   "fhir_bundle"))]):
    """A FHIR R4 Bundle (transaction, batch or collection) of Patient, Observation,
    Condition and MedicationStatement/MedicationRequest — or the same resources as Bulk
    Data NDJSON lines — mapped to events, stored and forecast in one transaction.
    Unmapped resources and codes are counted; ``report`` lists what was mapped and the
    served model's features no input feeds (starved)."""
    bundle = await fhir_body(request)
    out = await anyio.to_thread.run_sync(ingest_bundle, service, bundle, caller,
                                         access_of(request))
    return json_response(out)


class CdsAuth:
    """CDS Hooks auth: a JWT from a registered CDS client, or a twincast key."""

    def __init__(self, action: str):
        self.action = action

    def __call__(self, request: Request, service: Service, credentials: Credentials
                 ) -> tuple[Caller, str]:  # in the thread pool: it reads the store
        note_access(request, self.action)
        token = credentials.credentials.strip() if credentials else ""
        if not token:
            raise Unauthorized("missing 'Authorization: Bearer <JWT or key>' header")
        if token.startswith(KEY_PREFIX):
            key = service.store.keys.authenticate(token)
            if key is None:
                raise Unauthorized("unknown or revoked API key")
            caller = Caller(key.name, key.id, key.role)
            request.state.access["caller"] = caller
            if not may(key.role, Action.WRITE_TWINS):
                raise Forbidden(f"role '{key.role}' may not call CDS services")
            return caller, key.name  # the same sender as on /v1/fhir
        if service.cds_verifier is None or not service.config.cds_clients:
            raise Unauthorized("no CDS clients are registered: use a twincast key")
        # the endpoint being called, from the configured public URL (never the Host header)
        client = service.cds_verifier.verify(token, service.config.endpoint(request.url.path))
        caller = Caller(client.name, None, "clinical")  # CDS clients act as clinical
        request.state.access["caller"] = caller
        return caller, client.sender


CdsCaller = tuple[Caller, str]  # the caller, and the sender that scopes its patient ids


def _ours(service: TwinService, service_id: str) -> None:
    if service_id != cds.service_id(service):
        raise NotFound(f"no CDS service {service_id!r}")


@router.get("/cds-services", tags=["cds-hooks"], responses={**ERRORS})
def cds_discovery(service: Service, _: Annotated[CdsCaller, Depends(CdsAuth("cds_discovery"))]
                  ) -> dict:
    """CDS Hooks discovery: the patient-view service and its prefetch templates."""
    return cds.discovery(service)


@router.post("/cds-services/{service_id}", tags=["cds-hooks"], openapi_extra=CDS_BODY,
             responses={**ERRORS, **NOT_FOUND, **TOO_LARGE,
                        412: {"model": S.ErrorOut, "description": "prefetch needed"}})
async def cds_call(request: Request, service_id: str, service: Service,
                   auth: Annotated[CdsCaller, Depends(CdsAuth("cds_call"))]) -> dict:
    """A patient-view hook call: update the twin from prefetch, forecast, answer cards
    (the twin's events and the patient-id link in one transaction)."""
    _ours(service, service_id)
    body = await _body(request)
    if not isinstance(body, dict) or body.get("hook") != cds.HOOK or not isinstance(
            body.get("hookInstance"), str) or not isinstance(body.get("context"), dict) \
            or not body["context"].get("patientId"):
        raise BadInput("a patient-view request needs hook, hookInstance and "
                       "context.patientId", ["body"])
    caller, sender = auth
    out = await anyio.to_thread.run_sync(cds.call_service, service, body, caller, sender,
                                         access_of(request))
    request.state.access["subject_id"] = out["twincast"]["subject_id"]
    return out


@router.post("/cds-services/{service_id}/feedback", tags=["cds-hooks"],
             openapi_extra=FEEDBACK_BODY, responses={**ERRORS, **NOT_FOUND, **TOO_LARGE})
async def cds_feedback(request: Request, service_id: str, service: Service,
                       auth: Annotated[CdsCaller, Depends(CdsAuth("cds_feedback"))]) -> dict:
    """Card feedback (accepted or overridden), kept for auditors."""
    _ours(service, service_id)
    body = await _body(request)
    return {"stored": await anyio.to_thread.run_sync(cds.store_feedback, service, service_id,
                                                     body, auth[0].name)}

