"""FHIR at the service's edge: bundles in (one transaction), RiskAssessment out."""

from __future__ import annotations

from typing import Any

from features.fhir import FhirError, FhirImport, FhirMapping, bundle_to_events
from serving.core import Caller, TwinCore, _forecast, forecast_out, twin_view
from serving.errors import BadInput, NotFound
from serving.forecasting import forecast_values
from serving.store.models import Event, Identifier, Twin
from serving.store.repo import EventRow, latest_values_of

FHIR_SOURCE = "fhir:"
UCUM = "http://unitsofmeasure.org"


def ingest_bundle(core: TwinCore, bundle: Any, caller: Caller,
                  mapping: FhirMapping | None = None) -> dict[str, Any]:
    """Store a bundle's events and forecast every patient in it — all in one transaction."""
    try:
        result: FhirImport = bundle_to_events(bundle, mapping)
    except FhirError as exc:
        loc = ["body", *([f"entry[{exc.entry}]"] if exc.entry is not None else []),
               *([exc.element] if exc.element else [])]
        raise BadInput(str(exc), loc) from None
    model = core.require_model()
    out = []
    with core.store.write() as s:
        for key, patient in result.patients.items():
            system, _, value = key.partition("|") if "|" in key else ("fhir", "", key)
            sid = core.store.subject_for_identifier(s, system, value, create=True)
            for sys_, val in patient.identifiers[1:]:
                core.store.link_identifier(s, sys_, val, sid)
            twin = core.store.lock_twin(s, sid, create=True)
            rows = [EventRow(e.time, e.code, e.numeric_value, e.text_value, e.event_id,
                             FHIR_SOURCE + e.source)
                    for e in result.events if e.patient == key]
            added, dupes = core.store.add_events(s, twin, rows, source=caller.name)
            frame = core.store.events_frame(s, sid)
            watermark = frame["recorded_at"].max().to_pydatetime() if len(frame) else None
            res = _forecast(model, frame, sid, None)
            row = core.store.add_forecast(s, forecast_values(model, res, watermark,
                                                             caller.name, caller.key_id))
            fc = forecast_out(row)
            twin.view = twin_view(twin, latest_values_of(frame).get(sid, []), fc)
            out.append({"identifier": key, "subject_id": sid, "added": added,
                        "duplicates": dupes, "forecast": fc})
    return {"patients": out, "unmapped": dict(result.unmapped),
            "skipped": dict(result.skipped)}


def risk_assessment(core: TwinCore, subject_id: int) -> dict[str, Any]:
    """The twin's current forecast as a FHIR R4 RiskAssessment."""
    from sqlalchemy import select

    with core.store.read() as s:
        twin = s.get(Twin, subject_id)
        if twin is None:
            raise NotFound(f"no twin with subject_id {subject_id}")
        fc = core.store.latest_forecast(s, subject_id)
        if fc is None:
            raise NotFound(f"twin {subject_id} has no forecast yet")
        ident = s.execute(select(Identifier).where(Identifier.subject_id == subject_id)
                          .order_by(Identifier.id).limit(1)).scalar_one_or_none()
        basis = list(s.execute(select(Event.source).where(
            Event.subject_id == subject_id, Event.source.like(FHIR_SOURCE + "Observation/%"),
            Event.time <= fc.as_of).order_by(Event.time.desc()).limit(20)).scalars()) \
            if fc.as_of else []
    model = core.require_model()
    subject = ({"identifier": {"system": ident.system, "value": ident.value}} if ident
               else {"identifier": {"system": "urn:twincast:subject", "value": str(subject_id)}})
    task = model.bundle.task
    outcome = " or ".join(task.outcome.all_codes())
    ra: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": fc.forecast_id,
        "status": "final" if fc.status == "ok" else "cannot-be-obtained",
        "subject": subject,
        "method": {"coding": [{"system": "urn:twincast:model",
                               "code": f"{fc.model_name}/{fc.model_version}",
                               "display": f"{fc.model_name} version {fc.model_version}"}],
                   "text": f"{fc.model_name} version {fc.model_version} (MLflow run "
                           f"{fc.run_id})"},
    }
    if fc.as_of:
        ra["occurrenceDateTime"] = fc.as_of.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    if basis:
        ra["basis"] = [{"reference": b.removeprefix(FHIR_SOURCE)} for b in basis]
    if fc.status == "ok":
        ra["prediction"] = [
            {"outcome": {"text": f"{task.name}: {outcome}"},
             "probabilityDecimal": round(float(p), 6),
             "whenRange": {"low": {"value": 0, "unit": "d", "system": UCUM, "code": "d"},
                           "high": {"value": int(h.removesuffix("d")), "unit": "d",
                                    "system": UCUM, "code": "d"}}}
            for h, p in (fc.risks or {}).items()]
        top = [c["text"] for c in (fc.contributions or [])[:5]]
        ra["note"] = [{"text": "Top contributions (associational, raw model scale): "
                               + "; ".join(top)}] if top else []
    else:
        ra["note"] = [{"text": f"Not eligible: {fc.reason}"}]
    if not ra.get("note"):
        ra.pop("note", None)
    return ra
