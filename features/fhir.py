"""FHIR R4 bundles to MEDS events, through a mapping file.

Patient (gender, birthDate, deceased[x]), Observation (valueQuantity), Condition and
MedicationStatement / MedicationRequest resources become events; LOINC, SNOMED CT,
ICD-10 and RxNorm codes map to twincast codes with units and unit conversion
(``features/fhir_mapping.yaml``).  Resources and codes that are not mapped are counted,
never silently dropped; a malformed bundle raises :class:`FhirError` naming the entry and
the element.  No value is echoed in an error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from features.errors import FeaturesError

DEFAULT_MAPPING = Path(__file__).with_name("fhir_mapping.yaml")
FINAL_STATUSES = {"final", "amended", "corrected", "preliminary"}


class FhirError(FeaturesError):
    """A bundle that is not valid FHIR for twincast; names the entry and element."""

    def __init__(self, message: str, *, entry: int | None = None, element: str | None = None):
        self.entry, self.element, self.detail = entry, element, message
        where = []
        if entry is not None:
            where.append(f"entry[{entry}]")
        if element:
            where.append(element)
        super().__init__(f"{'.'.join(where)}: {message}" if where else message)


class Conversion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = 1.0
    offset: float = 0.0


class CodeRule(BaseModel):
    """One source code (glob allowed) in a code system, and the twincast code it becomes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str
    code: str
    to: str
    unit: str | None = None
    units: dict[str, Conversion] = Field(
        default_factory=dict,
        description="source unit (UCUM code or text) -> conversion to ``unit``")

    def matches(self, system: str | None, code: str | None) -> bool:
        return system == self.system and code is not None and fnmatchcase(code, self.code)


class FhirMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    observations: list[CodeRule] = Field(default_factory=list)
    conditions: list[CodeRule] = Field(default_factory=list)
    medications: list[CodeRule] = Field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MAPPING) -> FhirMapping:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    @staticmethod
    def find(rules: list[CodeRule], codings: list[dict]) -> tuple[CodeRule | None, str]:
        """The first rule matching any coding, and a label for the first coding."""
        for c in codings:
            for r in rules:
                if r.matches(c.get("system"), c.get("code")):
                    return r, f"{c.get('system')}|{c.get('code')}"
        first = codings[0] if codings else {}
        return None, f"{first.get('system')}|{first.get('code')}"

    def units(self) -> dict[str, str]:
        return {r.to: r.unit for r in (*self.observations,) if r.unit}


@dataclass
class PatientRecord:
    key: str  # "system|value" of the first identifier, else "Patient/<id>"
    fhir_id: str | None
    identifiers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class FhirEvent:
    patient: str
    time: datetime | None  # naive UTC
    code: str
    numeric_value: float | None
    text_value: str | None
    event_id: str  # "<resourceType>/<id>": re-sending a bundle adds nothing
    source: str  # the FHIR reference, for RiskAssessment.basis


@dataclass
class FhirImport:
    patients: dict[str, PatientRecord] = field(default_factory=dict)
    events: list[FhirEvent] = field(default_factory=list)
    unmapped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        return {"patients": len(self.patients), "events": len(self.events),
                "unmapped": dict(self.unmapped), "skipped": dict(self.skipped)}


def parse_time(value: Any, *, entry: int, element: str) -> datetime:
    """FHIR date or dateTime to naive UTC (a date is midnight UTC)."""
    if not isinstance(value, str) or not value:
        raise FhirError("expected a FHIR date or dateTime", entry=entry, element=element)
    try:
        if len(value) == 10:
            t = datetime.fromisoformat(value).replace(tzinfo=UTC)
        elif len(value) in (4, 7):
            t = datetime.fromisoformat(value + ("-01-01" if len(value) == 4 else "-01")
                                       ).replace(tzinfo=UTC)
        else:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FhirError("not a valid FHIR date or dateTime", entry=entry,
                        element=element) from None
    if t.tzinfo is None:
        raise FhirError("a FHIR dateTime with a time needs a time zone", entry=entry,
                        element=element)
    try:
        t = t.astimezone(UTC)
    except OverflowError:
        raise FhirError("time is outside the representable range", entry=entry,
                        element=element) from None
    if t > datetime.now(UTC):
        raise FhirError("time is in the future", entry=entry, element=element)
    return t.replace(tzinfo=None)


def _codings(obj: Any, *, entry: int, element: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("coding", []), list):
        raise FhirError("expected a CodeableConcept with a coding list", entry=entry,
                        element=element)
    return [c for c in obj.get("coding", []) if isinstance(c, dict)]


def _subject(res: dict, full_urls: dict[str, str], *, entry: int) -> str:
    ref = (res.get("subject") or {}).get("reference") if isinstance(res.get("subject"),
                                                                     dict) else None
    if not isinstance(ref, str) or not ref:
        raise FhirError("missing subject.reference to a Patient", entry=entry,
                        element="subject.reference")
    return full_urls.get(ref, ref)


def bundle_to_events(bundle: Any, mapping: FhirMapping | None = None) -> FhirImport:
    """Convert one Bundle (transaction, batch or collection) into events per patient."""
    mapping = mapping or FhirMapping.load()
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError("expected a FHIR Bundle (resourceType 'Bundle')", element="resourceType")
    if bundle.get("type") not in ("transaction", "batch", "collection"):
        raise FhirError("Bundle.type must be transaction, batch or collection", element="type")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise FhirError("Bundle.entry must be a list", element="entry")
    out = FhirImport()
    full_urls: dict[str, str] = {}  # references (Patient/<id>, urn:uuid:…) -> patient key
    key_of_entry: dict[int, str] = {}
    for i, e in enumerate(entries):
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise FhirError("entry without a resource (or its resourceType)", entry=i,
                            element="resource")
        if res["resourceType"] == "Patient":
            pid = res.get("id")
            if pid is not None and not isinstance(pid, str):
                raise FhirError("Patient.id must be a string", entry=i, element="id")
            ids = _identifiers(res.get("identifier", []), entry=i)
            if not ids and not pid:
                raise FhirError("a Patient needs an id or an identifier", entry=i,
                                element="identifier")
            key = f"{ids[0][0]}|{ids[0][1]}" if ids else f"Patient/{pid}"
            out.patients[key] = PatientRecord(key, pid, ids)
            key_of_entry[i] = key
            for alias in (f"Patient/{pid}" if pid else None, e.get("fullUrl")):
                if alias:
                    full_urls[alias] = key
    for i, e in enumerate(entries):
        res = e["resource"]
        kind = res["resourceType"]
        rid = f"{kind}/{res.get('id') or e.get('fullUrl') or i}"
        if kind == "Patient":
            _patient_events(res, key_of_entry[i], rid, i, out)
            continue
        if kind not in ("Observation", "Condition", "MedicationStatement", "MedicationRequest"):
            out.skipped[kind] += 1
            continue
        patient = _subject(res, full_urls, entry=i)
        if patient not in out.patients:
            raise FhirError("subject refers to a Patient that is not in the bundle", entry=i,
                            element="subject.reference")
        if kind == "Observation":
            _observation(res, patient, rid, i, mapping, out)
        elif kind == "Condition":
            _coded(res, patient, rid, i, mapping.conditions, "code",
                   ("onsetDateTime", "recordedDate"), out, kind)
        else:
            field_ = "medicationCodeableConcept"
            times = (("effectiveDateTime", "effectivePeriod.start", "dateAsserted")
                     if kind == "MedicationStatement" else ("authoredOn",))
            _coded(res, patient, rid, i, mapping.medications, field_, times, out, kind)
    return out


def _identifiers(raw: Any, *, entry: int) -> list[tuple[str, str]]:
    """A Patient's (system, value) identifiers; those without a value are skipped."""
    if not isinstance(raw, list):
        raise FhirError("Patient.identifier must be a list", entry=entry, element="identifier")
    out = []
    for k, x in enumerate(raw):
        if not isinstance(x, dict):
            raise FhirError("an identifier must be an object", entry=entry,
                            element=f"identifier[{k}]")
        system, value = x.get("system", ""), x.get("value")
        if value is None:
            continue
        if not isinstance(system, str) or isinstance(value, bool) or not isinstance(
                value, str | int):
            raise FhirError("identifier system and value must be strings", entry=entry,
                            element=f"identifier[{k}]")
        out.append((system, str(value)))
    return out


def _patient_events(res: dict, key: str, rid: str, i: int, out: FhirImport) -> None:
    gender = res.get("gender")
    if gender in ("female", "male"):
        out.events.append(FhirEvent(key, None, f"GENDER//{gender[0].upper()}", None, None,
                                    rid + "#gender", rid))
    if res.get("birthDate"):
        out.events.append(FhirEvent(key, parse_time(res["birthDate"], entry=i,
                                                     element="birthDate"),
                                    "MEDS_BIRTH", None, None, rid + "#birth", rid))
    if res.get("deceasedDateTime"):
        out.events.append(FhirEvent(key, parse_time(res["deceasedDateTime"], entry=i,
                                                     element="deceasedDateTime"),
                                    "MEDS_DEATH", None, None, rid + "#death", rid))


def _observation(res: dict, patient: str, rid: str, i: int, mapping: FhirMapping,
                 out: FhirImport) -> None:
    if res.get("status") not in FINAL_STATUSES:
        out.skipped[f"Observation (status {res.get('status')})"] += 1
        return
    rule, label = mapping.find(mapping.observations,
                               _codings(res.get("code"), entry=i, element="code"))
    if rule is None:
        out.unmapped[f"Observation {label}"] += 1
        return
    time = parse_time(res.get("effectiveDateTime") or (res.get("effectivePeriod") or {})
                      .get("start"), entry=i, element="effectiveDateTime")
    q = res.get("valueQuantity")
    if not isinstance(q, dict) or isinstance(q.get("value"), bool) or not isinstance(
            q.get("value"), int | float):
        raise FhirError("expected valueQuantity with a numeric value", entry=i,
                        element="valueQuantity.value")
    value = float(q["value"])
    if value != value or value in (float("inf"), float("-inf")):
        raise FhirError("non-finite value", entry=i, element="valueQuantity.value")
    unit = q.get("code") or q.get("unit")
    if rule.units and unit != rule.unit:
        conv = rule.units.get(unit)
        if conv is None:
            out.unmapped[f"Observation {label} unit {unit}"] += 1
            return
        value = value * conv.scale + conv.offset
    out.events.append(FhirEvent(patient, time, rule.to, value, None, rid, rid))


def _coded(res: dict, patient: str, rid: str, i: int, rules: list[CodeRule], element: str,
           time_fields: tuple[str, ...], out: FhirImport, kind: str) -> None:
    rule, label = FhirMapping.find(rules, _codings(res.get(element), entry=i, element=element))
    if rule is None:
        out.unmapped[f"{kind} {label}"] += 1
        return
    raw = None
    for f in time_fields:
        node: Any = res
        for part in f.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node:
            raw, used = node, f
            break
    if raw is None:
        raise FhirError(f"needs one of {', '.join(time_fields)}", entry=i, element=time_fields[0])
    out.events.append(FhirEvent(patient, parse_time(raw, entry=i, element=used), rule.to, None,
                                None, rid, rid))


def load_bundle(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise FhirError(f"not JSON (line {exc.lineno})") from None


IDENTIFIER_SYSTEM = "urn:twincast:subject"


def events_to_bundle(events, mapping: FhirMapping | None = None, *,
                     identifier_system: str = IDENTIFIER_SYSTEM) -> dict:
    """MEDS events as a FHIR R4 transaction Bundle (the inverse of ``bundle_to_events``
    for mapped codes): one Patient per subject, Observations, Conditions and
    MedicationStatements, each with a stable id."""
    import pandas as pd

    mapping = mapping or FhirMapping.load()
    first = {}
    for kind, rules in (("Observation", mapping.observations),
                        ("Condition", mapping.conditions),
                        ("MedicationStatement", mapping.medications)):
        for r in rules:
            if r.to not in first and "*" not in r.code:
                first[r.to] = (kind, r)
    entries = []

    def add(resource: dict) -> None:
        url = f"urn:uuid:{resource['resourceType'].lower()}-{resource['id']}"
        entries.append({"fullUrl": url, "resource": resource,
                        "request": {"method": "PUT",
                                    "url": f"{resource['resourceType']}/{resource['id']}"}})

    def when(t) -> str:
        return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%S+00:00")

    for sid, ev in events.groupby("subject_id", sort=True):
        pid = f"p{sid}"
        patient = {"resourceType": "Patient", "id": pid,
                   "identifier": [{"system": identifier_system, "value": str(sid)}]}
        codes = ev["code"].astype(str)
        if (codes == "GENDER//F").any():
            patient["gender"] = "female"
        elif (codes == "GENDER//M").any():
            patient["gender"] = "male"
        birth = ev.loc[codes == "MEDS_BIRTH", "time"]
        if len(birth):
            patient["birthDate"] = pd.Timestamp(birth.iloc[0]).strftime("%Y-%m-%d")
        death = ev.loc[codes == "MEDS_DEATH", "time"]
        if len(death):
            patient["deceasedDateTime"] = when(death.iloc[0])
        add(patient)
        ref = {"reference": f"Patient/{pid}"}
        for n, r in enumerate(ev.itertuples(index=False)):
            hit = first.get(str(r.code))
            if hit is None or pd.isna(r.time):
                continue
            kind, rule = hit
            coding = {"coding": [{"system": rule.system, "code": rule.code}]}
            rid = f"{pid}-{n}"
            if kind == "Observation":
                if pd.isna(r.numeric_value):
                    continue
                add({"resourceType": "Observation", "id": rid, "status": "final",
                     "code": coding, "subject": ref, "effectiveDateTime": when(r.time),
                     "valueQuantity": {"value": float(r.numeric_value), "unit": rule.unit,
                                       "system": "http://unitsofmeasure.org",
                                       "code": rule.unit}})
            elif kind == "Condition":
                add({"resourceType": "Condition", "id": rid, "code": coding, "subject": ref,
                     "onsetDateTime": when(r.time)})
            else:
                add({"resourceType": "MedicationStatement", "id": rid, "status": "active",
                     "medicationCodeableConcept": coding, "subject": ref,
                     "effectiveDateTime": when(r.time)})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def import_to_frame(result: FhirImport, subject_of: dict[str, int]):
    """The events of an import as a MEDS frame, given each patient's subject id."""
    import numpy as np
    import pandas as pd

    ev = result.events
    return pd.DataFrame({
        "subject_id": np.array([subject_of[e.patient] for e in ev], dtype=np.int64),
        "time": pd.Series([e.time for e in ev], dtype="datetime64[us]"),
        "code": [e.code for e in ev],
        "numeric_value": np.array([np.nan if e.numeric_value is None else e.numeric_value
                                   for e in ev], dtype=np.float64),
        "text_value": pd.Series([e.text_value for e in ev], dtype=object),
    })
