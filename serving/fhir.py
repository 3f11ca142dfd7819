"""FHIR at the service's edge: a bundle becomes one batch for the write path; the twin's
current forecast goes out as a RiskAssessment.

Patients are named by their identifiers.  An identifier with a system is global (an MRN
system is a URI); ids that only mean something to their sender — an identifier without a
system, a Patient's logical id when it has no identifier — are scoped by the sender (the
API key's name), so every source's ``Patient/123`` is its own patient.
"""

from __future__ import annotations

import json
from typing import Any

from features.fhir import FhirError, FhirImport, FhirMapping, PatientRecord, bundle_to_events
from features.fhir_bulk import TooManyLines, lines_to_bundle
from features.fhir_codes import UCUM
from serving.core import TwinService
from serving.errors import BadInput, PayloadTooLarge
from serving.store.identity import MAX_SYSTEM, MAX_VALUE, Ident, scoped_system
from serving.store.twins import EventRow
from serving.writes import AccessInfo, Caller, TwinInput

FHIR_SOURCE = "fhir:"


MAX_BUNDLE_ENTRIES = 50_000
MAX_BUNDLE_PATIENTS = 1_000
NDJSON_TYPES = ("application/fhir+ndjson", "application/ndjson", "application/x-ndjson")


def is_ndjson(content_type: str | None) -> bool:
    """Whether a request body is FHIR Bulk Data NDJSON (one resource per line)."""
    return (content_type or "").split(";", 1)[0].strip().lower() in NDJSON_TYPES


def ndjson_bundle(raw: bytes) -> dict[str, Any]:
    """NDJSON lines as one collection bundle (entries keep their line numbers)."""
    try:
        return lines_to_bundle(raw, MAX_BUNDLE_ENTRIES)
    except TooManyLines as exc:
        raise PayloadTooLarge(f"more than {exc.limit} lines: at most {exc.limit} resources "
                              "per request", ["body"]) from None
    except UnicodeDecodeError:
        raise BadInput("the body is not UTF-8 text", ["body"]) from None
    except FhirError as exc:
        raise BadInput(str(exc), ["body", exc.where or "line"]) from None


def convert(bundle: Any, mapping: FhirMapping | None = None) -> FhirImport:
    """The bundle's events per patient; a malformed bundle is a 422 naming the entry (or
    the NDJSON line), one with more than ``MAX_BUNDLE_ENTRIES`` entries or
    ``MAX_BUNDLE_PATIENTS`` patients a 413."""
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    if isinstance(entries, list) and len(entries) > MAX_BUNDLE_ENTRIES:
        raise PayloadTooLarge(f"{len(entries)} entries: at most {MAX_BUNDLE_ENTRIES} per "
                              "bundle", ["body", "entry"])
    try:
        result = bundle_to_events(bundle, mapping)
    except FhirError as exc:
        where = f"entry[{exc.entry}]" if exc.entry is not None else None
        if where and isinstance(entries, list) and isinstance(entries[exc.entry], dict) \
                and "line" in entries[exc.entry]:  # NDJSON: name the line, not the entry
            where = f"line {entries[exc.entry]['line']}"
        message = exc.detail if where else str(exc)
        loc = ["body", *([where] if where else []), *([exc.element] if exc.element else [])]
        raise BadInput(f"{'.'.join(loc[1:])}: {message}" if len(loc) > 1 else message,
                       loc) from None
    if len(result.patients) > MAX_BUNDLE_PATIENTS:
        raise PayloadTooLarge(f"{len(result.patients)} patients: at most "
                              f"{MAX_BUNDLE_PATIENTS} per bundle", ["body", "entry"])
    return result


def patient_identifiers(patient: PatientRecord, sender: str) -> tuple[Ident, ...]:
    out = []
    for system, value in patient.identifiers:
        ident = (system, value) if system else (scoped_system("no-system", sender), value)
        out.append(ident)
    if not out:
        out.append((scoped_system("fhir-id", sender), f"Patient/{patient.fhir_id}"))
    for system, value in out:
        if len(system) > MAX_SYSTEM or len(value) > MAX_VALUE or not value:
            raise BadInput(f"an identifier's system (at most {MAX_SYSTEM} characters) or "
                           f"value (1 to {MAX_VALUE}) has the wrong length",
                           ["body", "Patient", "identifier"])
    return tuple(out)


def bundle_inputs(result: FhirImport, sender: str) -> list[TwinInput]:
    by_patient: dict[str, list[EventRow]] = {k: [] for k in result.patients}
    for e in result.events:  # a resource id is a logical id: a new version replaces
        by_patient[e.patient].append(EventRow(e.time, e.code, e.numeric_value, e.text_value,
                                              None, FHIR_SOURCE + e.source,
                                              logical_id=e.event_id, retract=e.retract))
    return [TwinInput(identifiers=patient_identifiers(p, sender), events=by_patient[key],
                      label=key) for key, p in result.patients.items()]


def ingest_bundle(service: TwinService, bundle: Any, caller: Caller, access: AccessInfo | None,
                  mapping: FhirMapping | None = None, *, max_events: int | None = None,
                  max_patients: int | None = None) -> dict[str, Any]:
    """Store a bundle's events and forecast every patient in it — one transaction."""
    result = convert(bundle, mapping)
    n_events = sum(not e.retract for e in result.events)
    if (max_events is not None and n_events > max_events) or (
            max_patients is not None and len(result.patients) > max_patients):
        raise PayloadTooLarge(f"{len(result.patients)} patients and {n_events} events: at "
                              f"most {max_patients} patients and {max_events} events per "
                              "request", ["body"])
    outcomes = service.writer.write(bundle_inputs(result, caller.name), caller, access)
    return {"patients": [{"identifier": o.label, "subject_id": o.subject_id,
                          "created": o.created, "added": o.added,
                          "duplicates": o.duplicates, "superseded": o.superseded,
                          "forecast": o.forecast}
                         for o in outcomes],
            "unmapped": dict(result.unmapped), "skipped": dict(result.skipped),
            "report": mapping_report(service, result, mapping)}


def mapping_report(service: TwinService, result: FhirImport,
                   mapping: FhirMapping | None) -> dict[str, Any]:
    """The import's mapping report, with the served model's starved features."""
    model = service.models.model
    codes = model.bundle.spec.features_by_code() if model is not None else None
    return result.report(codes, (mapping or FhirMapping.default()).targets())


def risk_assessment(service: TwinService, subject_id: int) -> dict[str, Any]:
    """The twin's current forecast as a FHIR R4 RiskAssessment."""
    store = service.store
    fc = service.current_forecast(subject_id)
    as_of = fc["as_of"]
    with store.read() as s:
        ident = store.identities.first_identifier(s, subject_id)
        basis = store.twins.sources_before(s, subject_id, FHIR_SOURCE + "Observation/",
                                           _naive(as_of)) if as_of else []
    system, value = ident if ident else ("urn:twincast:subject", str(subject_id))
    model = fc["model"]
    task = service.models.current().bundle.task
    outcome = " or ".join(task.outcome.all_codes())
    ra: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": fc["forecast_id"],
        "status": "final" if fc["status"] == "ok" else "cannot-be-obtained",
        "subject": {"identifier": {"system": system, "value": value}},
        "method": {"coding": [{"system": "urn:twincast:model",
                               "code": f"{model['name']}/{model['version']}",
                               "display": f"{model['name']} version {model['version']}"}],
                   "text": f"{model['name']} version {model['version']} (MLflow run "
                           f"{model['run_id']})"},
    }
    if as_of:
        ra["occurrenceDateTime"] = as_of.replace("Z", "+00:00")
    if basis:
        ra["basis"] = [{"reference": b.removeprefix(FHIR_SOURCE)} for b in basis]
    if fc["status"] == "ok":
        ra["prediction"] = [
            {"outcome": {"text": f"{task.name}: {outcome}"},
             "probabilityDecimal": round(float(p), 6),
             "whenRange": {"low": {"value": 0, "unit": "d", "system": UCUM, "code": "d"},
                           "high": {"value": int(h.removesuffix("d")), "unit": "d",
                                    "system": UCUM, "code": "d"}}}
            for h, p in (fc["risks"] or {}).items()]
        top = [c["text"] for c in (fc["contributions"] or [])[:5]]
        notes = []
        if top:
            notes.append({"text": "Top contributions (associational, raw model scale): "
                                  + "; ".join(top)})
        # forecast values go in the note only, never as Observations: a receiving system
        # would file those as measurements
        notes += [{"text": trajectory_text(t)} for t in fc.get("trajectories") or []]
        if notes:
            ra["note"] = notes
    else:
        ra["note"] = [{"text": f"Not eligible: {fc['reason']}"}]
    return ra


def trajectory_text(t: dict[str, Any]) -> str:
    """One trajectory in words (a forecast, not a measurement)."""
    unit = f" {t['unit']}" if t.get("unit") else ""
    spans = ", ".join(f"{round(i['level'] * 100)}% interval {i['lower']:.1f}–"
                      f"{i['upper']:.1f}" for i in t["intervals"])
    return (f"Forecast, not a measurement: {t['code']} about {t['horizon_days']} days after "
            f"the as-of time (within {t['tolerance_days']} days), median {t['median']:.1f}"
            f"{unit} ({spans}), if {t['conditional_on']}.")


def _naive(iso_z: str):
    from datetime import UTC, datetime

    return datetime.fromisoformat(iso_z.replace("Z", "+00:00")).astimezone(UTC).replace(
        tzinfo=None)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; not JSON, or nested too deep to parse, is a 422."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the body is not JSON", ["body"]) from None
    except RecursionError:
        raise BadInput("the body's JSON is nested too deeply", ["body"]) from None
