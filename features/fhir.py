"""FHIR R4 resources to MEDS events, as US Core 6.1.0 senders write them.

Resources and codes that are not mapped are counted, never silently dropped; a malformed
resource raises :class:`FhirError` naming the entry (or NDJSON line) and the element.  No
value is echoed in an error.  The rules, per resource:

- **Patient**: gender (female/male), ``birthDate``, ``deceasedDateTime``.
- **Observation**: statuses ``final``, ``amended``, ``corrected`` and ``preliminary`` are
  results; ``entered-in-error`` and ``cancelled`` are never stored and take back a
  version stored earlier (a *retraction*); ``registered`` and ``unknown`` carry no result
  (counted).  A re-sent resource id with new content replaces what it corrects (the
  store keeps both, the old one superseded).  Values: ``valueQuantity`` converted by its
  UCUM ``code`` (the display ``unit`` is never read), ``valueCodeableConcept`` and
  ``valueString`` where the rule names that value type, and each ``component`` on its
  own (the blood-pressure panel's systolic and diastolic); any other value type, unit or
  code is counted.  Time: ``effectiveDateTime``, ``effectiveInstant``, or
  ``effectivePeriod.start`` (else ``.end``) — the time the value describes; ``issued``
  only when there is none.
- **Condition**: ``verificationStatus`` refuted or entered-in-error → excluded (the
  latter also retracts); unconfirmed, provisional and differential → not a diagnosis
  yet (counted); ``clinicalStatus`` does not exclude (a resolved problem was still
  diagnosed).  Time: ``recordedDate`` — when the record knew it, so a forecast never sees
  a diagnosis before it was made — else ``onsetDateTime`` / ``onsetPeriod.start``.
- **MedicationRequest** (status active, on-hold, completed or stopped, and intent an
  order) and **MedicationStatement** (active, completed, stopped, on-hold): the drug from
  ``medicationCodeableConcept`` or a referenced Medication, at clinical-drug (RxNorm
  SCD) or ingredient level, to the ingredient class by a cited table; entered-in-error
  and cancelled retract; the rest are counted.  Time: ``authoredOn``;
  for a statement ``effectiveDateTime``, ``effectivePeriod.start``, else ``dateAsserted``.
- The same value sent twice in one import (same patient, code, time, value: an interface
  replay under a new resource id) is kept once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from features.errors import FeaturesError
from features.fhir_codes import (  # noqa: F401  (the mapping's names, re-exported)
    DEFAULT_MAPPING,
    UCUM,
    CodeRule,
    Conversion,
    FhirMapping,
    RuleIndex,
)

FLOAT32_MAX = 3.4028234663852886e38
RESULT_STATUSES = frozenset({"final", "amended", "corrected", "preliminary"})
RETRACTED = frozenset({"entered-in-error", "cancelled"})
REQUEST_STATUSES = frozenset({"active", "on-hold", "completed", "stopped"})
ORDER_INTENTS = frozenset({"order", "original-order", "reflex-order", "filler-order",
                           "instance-order"})
STATEMENT_STATUSES = frozenset({"active", "completed", "stopped", "on-hold"})
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
NOT_YET_VERIFIED = frozenset({"unconfirmed", "provisional", "differential"})
USED = ("Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement",
        "Medication")
MAX_TEXT = 1000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_LABEL = 120  # characters of a report key (codes, statuses: what the client sent)
MAX_KEYS = 500  # distinct keys a report counter keeps; beyond them: "(other)"
VALUE_KEYS = frozenset({  # Observation.value[x] and component.value[x]
    "valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger",
    "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime",
    "valuePeriod"})


class FhirError(FeaturesError):
    """A resource that is not valid FHIR for twincast; names where (``entry[i]`` of a
    bundle, or ``line N`` of an NDJSON file) and the element."""

    def __init__(self, message: str, *, entry: int | None = None, element: str | None = None,
                 where: str | None = None):
        self.entry, self.element, self.detail = entry, element, message
        self.where = where if where is not None else (
            f"entry[{entry}]" if entry is not None else None)
        parts = [p for p in (self.where, element) if p]
        super().__init__(f"{'.'.join(parts)}: {message}" if parts else message)


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
    # "<resourceType>/<id>[#part]": the resource's logical id, so a new version replaces
    # the old; None for a resource without an id (a transaction's POST): its events are
    # then keyed by content
    event_id: str | None
    source: str  # the FHIR reference, for RiskAssessment.basis
    retract: bool = False  # not an event: takes back the resource's stored events
    # which version of its resource wins within one import: (meta.lastUpdated as µs since
    # the epoch, else the lowest; then the resource's place in the input)
    version: tuple[int, int] = (0, 0)


class Tally(Counter):
    """A bounded count of labels from client input: each label cut to ``MAX_LABEL``
    characters, at most ``MAX_KEYS`` distinct labels (the rest under "(other)")."""

    def __missing__(self, key):
        return 0

    def __setitem__(self, key, value):
        key = str(key)[:MAX_LABEL]
        if key not in self and len(self) >= MAX_KEYS:
            key = "(other)"
        super().__setitem__(key, value)

    def __getitem__(self, key):
        return super().__getitem__(str(key)[:MAX_LABEL])


@dataclass
class FhirImport:
    patients: dict[str, PatientRecord] = field(default_factory=dict)
    events: list[FhirEvent] = field(default_factory=list)
    unmapped: Counter = field(default_factory=Tally)
    skipped: Counter = field(default_factory=Tally)
    mapped: Counter = field(default_factory=Tally)  # "twincast code <- system|code"
    sent: Counter = field(default_factory=Tally)  # values sent, per resource type
    # for imports that stream their events out (Bulk NDJSON): what they kept
    kept_counts: Counter | None = None
    fed_codes: set[str] | None = None

    def kept(self) -> Counter:
        """Events kept per resource type."""
        if self.kept_counts is not None:
            return self.kept_counts
        return Counter(e.source.split("/", 1)[0] for e in self.events if not e.retract)

    def fed(self) -> set[str]:
        """The twincast codes this input's events carry."""
        if self.fed_codes is not None:
            return self.fed_codes
        return {e.code for e in self.events if not e.retract}

    def report(self, spec_codes: dict[str, list[str]] | None = None,
               mappable: set[str] | None = None) -> dict[str, Any]:
        """What was mapped, what was not, coverage per resource type and — given the
        served model's feature codes (code → feature names) — its starved features:
        those no event of this input feeds (``mappable``: codes some rule can produce)."""
        kept = self.kept()
        out: dict[str, Any] = {
            "patients": len(self.patients),
            "events": sum(kept.values()),
            "mapped": dict(sorted(self.mapped.items())),
            "unmapped": dict(sorted(self.unmapped.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "coverage": {k: {"sent": n, "kept": kept.get(k, 0),
                             "share": round(kept.get(k, 0) / n, 4) if n else None}
                         for k, n in sorted(self.sent.items())}}
        if spec_codes is not None:
            fed = self.fed()
            out["starved"] = [
                {"code": code, "features": names,
                 "reason": ("no event of this input carries it" if mappable is None
                            or code in mappable else "no mapping rule produces it")}
                for code, names in sorted(spec_codes.items()) if code not in fed]
        return out

    def merge(self, other: FhirImport) -> None:
        for name in ("unmapped", "skipped", "mapped", "sent"):
            getattr(self, name).update(getattr(other, name))


def parse_time(value: Any, *, entry: int | None = None, element: str,
               where: str | None = None) -> datetime:
    """FHIR date or dateTime to naive UTC (a date is midnight UTC)."""
    def fail(message: str):
        return FhirError(message, entry=entry, element=element, where=where)

    if not isinstance(value, str) or not value:
        raise fail("expected a FHIR date or dateTime")
    try:
        if len(value) == 10:
            t = datetime.fromisoformat(value).replace(tzinfo=UTC)
        elif len(value) in (4, 7):
            t = datetime.fromisoformat(value + ("-01-01" if len(value) == 4 else "-01")
                                       ).replace(tzinfo=UTC)
        else:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise fail("not a valid FHIR date or dateTime") from None
    if t.tzinfo is None:
        raise fail("a FHIR dateTime with a time needs a time zone")
    try:
        t = t.astimezone(UTC)
    except OverflowError:
        raise fail("time is outside the representable range") from None
    if t > datetime.now(UTC):
        raise fail("time is in the future")
    return t.replace(tzinfo=None)


def _get(res: Any, path: str) -> Any:
    node = res
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def status_code(concept: Any) -> str | None:
    """The code of a status CodeableConcept (clinicalStatus, verificationStatus)."""
    if isinstance(concept, dict):
        for c in concept.get("coding") or ():
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                return c["code"]
    return None


class Converter:
    """Turns resources into events for one import (a bundle, or an NDJSON export):
    ``patient_of`` resolves a subject reference, ``medication_of`` a Medication
    reference; every resource's location is named in its errors."""

    def __init__(self, mapping: FhirMapping, out: FhirImport):
        self.mapping, self.out = mapping, out
        self.obs = mapping.index("observations")
        self.cond = mapping.index("conditions")
        self.meds = mapping.index("medications")
        self.medications: dict[str, dict] = {}  # reference -> Medication resource
        self.entry: int | None = None  # where the current resource is: its bundle entry
        self.where = ""  # … or its NDJSON file and line

    def at(self, *, entry: int | None = None, where: str | None = None) -> None:
        self.entry = entry
        self.where = where if where is not None else f"entry[{entry}]"

    def _eid(self, res: dict, rid: str, part: str = "") -> str | None:
        """The logical id of a resource's event: only a resource with its own id has one."""
        return rid + part if isinstance(res.get("id"), str) and res["id"] else None

    def fail(self, message: str, element: str | None = None) -> FhirError:
        return FhirError(message, entry=self.entry, element=element, where=self.where)

    # ------------------------------------------------------------------ patients
    def patient(self, res: dict) -> PatientRecord:
        pid = res.get("id")
        if pid is not None and not isinstance(pid, str):
            raise self.fail("Patient.id must be a string", "id")
        ids = _identifiers(res.get("identifier", []), self)
        if not ids and not pid:
            raise self.fail("a Patient needs an id or an identifier", "identifier")
        key = f"{ids[0][0]}|{ids[0][1]}" if ids else f"Patient/{pid}"
        rec = self.out.patients.get(key) or PatientRecord(key, pid, ids)
        self.out.patients[key] = rec
        return rec

    def patient_events(self, res: dict, key: str, rid: str) -> None:
        add, out = self.out.events.append, self.out
        gender = res.get("gender")
        out.sent["Patient"] += ("gender" in res) + ("birthDate" in res) + (
            "deceasedDateTime" in res)
        if gender in ("female", "male"):
            add(FhirEvent(key, None, f"GENDER//{gender[0].upper()}", None, None,
                          self._eid(res, rid, "#gender"), rid))
        elif gender is not None:  # the value itself is the patient's: never in a report
            out.unmapped["Patient gender (other than female or male)"] += 1
        if res.get("birthDate"):
            add(FhirEvent(key, parse_time(res["birthDate"], element="birthDate",
                                          entry=self.entry, where=self.where),
                          "MEDS_BIRTH", None, None, self._eid(res, rid, "#birth"), rid))
        if res.get("deceasedDateTime"):
            add(FhirEvent(key, parse_time(res["deceasedDateTime"], element="deceasedDateTime",
                                          entry=self.entry, where=self.where),
                          "MEDS_DEATH", None, None, self._eid(res, rid, "#death"), rid))

    # ------------------------------------------------------------------ clinical
    def resource(self, res: dict, patient: str, rid: str, order: int) -> None:
        """A clinical resource's events.  One with an id that yields none (a status that
        is not a result, a code or unit not mapped) replaces what an earlier version of
        it stored with nothing."""
        kind = res["resourceType"]
        start = len(self.out.events)
        if kind == "Observation":
            self.observation(res, patient, rid)
        elif kind == "Condition":
            self.condition(res, patient, rid)
        else:
            self.medication(res, patient, rid, kind)
        if len(self.out.events) == start and self._eid(res, rid) is not None:
            self.out.events.append(FhirEvent(patient, None, "", None, None, rid, rid,
                                             retract=True))
        self.stamp(res, start, order)

    def stamp(self, res: dict, start: int, order: int) -> None:
        """The version order of the events a resource just produced."""
        version = (last_updated(res), order)
        for e in self.out.events[start:]:
            e.version = version

    def _retract(self, res: dict, patient: str, rid: str) -> None:
        """Take back what an earlier version of this resource stored (by its id)."""
        if self._eid(res, rid) is None:
            self.out.skipped["retraction without a resource id (nothing to take back)"] += 1
            return
        self.out.events.append(FhirEvent(patient, None, "", None, None, rid, rid, retract=True))

    def _required_status(self, res: dict) -> str:
        status = res.get("status")
        if not isinstance(status, str) or not status:
            raise self.fail(f"{res['resourceType']}.status is required", "status")
        return status

    def observation(self, res: dict, patient: str, rid: str) -> None:
        out = self.out
        status = self._required_status(res)
        comps = res.get("component")
        if comps is not None and not isinstance(comps, list):
            raise self.fail("Observation.component must be a list", "component")
        has_value = not VALUE_KEYS.isdisjoint(res)
        out.sent["Observation"] += (len(comps) if comps else 0) + (has_value or not comps)
        if status in RETRACTED:
            self._retract(res, patient, rid)
            out.skipped[f"Observation (status {status})"] += 1
            return
        if status not in RESULT_STATUSES:
            out.skipped[f"Observation (status {status})"] += 1
            return
        codings = _codings(res.get("code"), self, "code")
        todo = []  # (node, rule, label, logical id, element prefix)
        if has_value or not comps:
            rule, label = self.obs.best(codings)
            if rule is None:
                out.unmapped[f"Observation {label}"] += 1
            else:
                todo.append((res, rule, label, self._eid(res, rid), ""))
        for k, comp in enumerate(comps or ()):
            if not isinstance(comp, dict):
                raise self.fail("a component must be an object", f"component[{k}]")
            rule, label = self.obs.best(_codings(comp.get("code"), self,
                                                 f"component[{k}].code"))
            if rule is None:
                out.unmapped[f"Observation component {label}"] += 1
                continue
            todo.append((comp, rule, label, self._eid(res, rid, f"#{label}"),
                         f"component[{k}]."))
        if not todo:
            return
        time = self._obs_time(res)
        if time is None:
            out.skipped["Observation without effective[x] or issued"] += len(todo)
            return
        for node, rule, label, eid, prefix in todo:
            self._value(node, rule, label, patient, eid, rid, time, prefix)

    def _obs_time(self, res: dict) -> datetime | None:
        for path in ("effectiveDateTime", "effectiveInstant", "effectivePeriod.start",
                     "effectivePeriod.end", "issued"):
            raw = _get(res, path)
            if raw is not None:
                return parse_time(raw, element=path, entry=self.entry, where=self.where)
        return None

    def _value(self, node: dict, rule: CodeRule, label: str, patient: str,
               eid: str | None, rid: str, time: datetime, prefix: str) -> None:
        out = self.out
        value: float | None = None
        text: str | None = None
        if "dataAbsentReason" in node and VALUE_KEYS.isdisjoint(node):
            out.skipped[f"Observation {label} (no value: dataAbsentReason)"] += 1
            return
        if rule.value == "quantity":
            if "valueQuantity" not in node:
                kinds = [k for k in node if k in VALUE_KEYS] or ["no value"]
                out.unmapped[f"Observation {label} {kinds[0]} where a quantity is "
                             "expected"] += 1
                return
            value = self._quantity(node["valueQuantity"], rule, label, prefix)
            if value is None:
                return
        elif rule.value == "string":
            raw = node.get("valueString")
            if not isinstance(raw, str):
                out.unmapped[f"Observation {label} without valueString"] += 1
                return
            text = raw[:MAX_TEXT]
        else:
            concept = node.get("valueCodeableConcept")
            codings = _codings(concept, self, prefix + "valueCodeableConcept") \
                if concept is not None else []
            text = next((rule.concepts[f"{c.get('system')}|{c.get('code')}"]
                         for c in codings
                         if f"{c.get('system')}|{c.get('code')}" in rule.concepts), None)
            if text is None:  # the concept is the patient's value: not named in a report
                out.unmapped[f"Observation {label} value not in the mapping"] += 1
                return
        out.mapped[f"{rule.to} <- {label}"] += 1
        out.events.append(FhirEvent(patient, time, rule.to, value, text, eid, rid))

    def _quantity(self, q: Any, rule: CodeRule, label: str, prefix: str) -> float | None:
        element = prefix + "valueQuantity.value"
        if not isinstance(q, dict) or isinstance(q.get("value"), bool) or not isinstance(
                q.get("value"), int | float):
            raise self.fail("expected valueQuantity with a numeric value", element)
        try:
            value = float(q["value"])
        except OverflowError:
            raise self.fail("number outside the representable range", element) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise self.fail("non-finite value", element)
        if abs(value) > FLOAT32_MAX:
            raise self.fail("number outside the float32 range MEDS stores", element)
        if q.get("comparator") is not None:
            self.out.unmapped[f"Observation {label} with a comparator"] += 1
            return None
        system, code = q.get("system"), q.get("code")
        if rule.unit is None:
            return value
        if system not in (None, UCUM) or not isinstance(code, str):
            self.out.unmapped[f"Observation {label} without a UCUM unit code"] += 1
            return None
        if code == rule.unit:
            return value
        conv = rule.units.get(code)
        if conv is None:
            self.out.unmapped[f"Observation {label} unit {code}"] += 1
            return None
        return value * conv.scale + conv.offset

    def condition(self, res: dict, patient: str, rid: str) -> None:
        out = self.out
        out.sent["Condition"] += 1
        verification = status_code(res.get("verificationStatus"))
        if verification in EXCLUDED_VERIFICATION:
            if verification == "entered-in-error":
                self._retract(res, patient, rid)
            out.skipped[f"Condition (verification {verification})"] += 1
            return
        if verification in NOT_YET_VERIFIED:
            out.skipped[f"Condition (verification {verification})"] += 1
            return
        rule, label = self.cond.best(_codings(res.get("code"), self, "code"))
        if rule is None:
            out.unmapped[f"Condition {label}"] += 1
            return
        time = self._first_time(res, ("recordedDate", "onsetDateTime", "onsetPeriod.start"))
        if time is None:
            out.skipped["Condition without recordedDate or a dated onset"] += 1
            return
        out.mapped[f"{rule.to} <- {label}"] += 1
        out.events.append(FhirEvent(patient, time, rule.to, None, None, self._eid(res, rid),
                                    rid))

    def medication(self, res: dict, patient: str, rid: str, kind: str) -> None:
        out = self.out
        out.sent[kind] += 1
        status = self._required_status(res)
        if status in RETRACTED:
            self._retract(res, patient, rid)
            out.skipped[f"{kind} (status {status})"] += 1
            return
        keep = REQUEST_STATUSES if kind == "MedicationRequest" else STATEMENT_STATUSES
        if status not in keep:
            out.skipped[f"{kind} (status {status})"] += 1
            return
        if kind == "MedicationRequest":
            intent = res.get("intent")
            if not isinstance(intent, str):
                raise self.fail("MedicationRequest.intent is required", "intent")
            if intent not in ORDER_INTENTS:
                out.skipped[f"{kind} (intent {intent})"] += 1
                return
            if res.get("doNotPerform") is True:
                out.skipped[f"{kind} (doNotPerform)"] += 1
                return
        concept, element = res.get("medicationCodeableConcept"), "medicationCodeableConcept"
        if concept is None:
            ref = _get(res, "medicationReference.reference")
            med = None
            if isinstance(ref, str) and ref.startswith("#"):  # a contained Medication
                med = next((c for c in res.get("contained") or () if isinstance(c, dict)
                            and c.get("resourceType") == "Medication"
                            and c.get("id") == ref[1:]), None)
            elif isinstance(ref, str):
                med = self.medications.get(ref) or self.medications.get(local_reference(ref))
            if med is None:
                raise self.fail("needs medicationCodeableConcept or a medicationReference to "
                                "a Medication in the same import", "medicationReference")
            concept, element = med.get("code"), "medicationReference"
        rule, label = self.meds.best(_codings(concept, self, element))
        if rule is None:
            out.unmapped[f"{kind} {label}"] += 1
            return
        times = (("authoredOn",) if kind == "MedicationRequest" else
                 ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"))
        time = self._first_time(res, times)
        if time is None:
            out.skipped[f"{kind} without {' or '.join(times)}"] += 1
            return
        out.mapped[f"{rule.to} <- {label}"] += 1
        out.events.append(FhirEvent(patient, time, rule.to, None, None, self._eid(res, rid),
                                    rid))

    def _first_time(self, res: dict, paths: tuple[str, ...]) -> datetime | None:
        for path in paths:
            raw = _get(res, path)
            if raw:
                return parse_time(raw, element=path, entry=self.entry, where=self.where)
        return None


def last_updated(res: dict) -> int:
    """``meta.lastUpdated`` as µs since the epoch (0 when absent or unreadable)."""
    raw = _get(res, "meta.lastUpdated")
    if not isinstance(raw, str):
        return 0
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int((t - EPOCH) / timedelta(microseconds=1))


def local_reference(ref: str) -> str:
    """``Type/id`` of a reference written absolutely or with a version
    (``https://ehr.example/fhir/Patient/7/_history/2`` → ``Patient/7``)."""
    ref = ref.split("/_history/", 1)[0]
    parts = ref.rstrip("/").split("/")
    return "/".join(parts[-2:]) if "://" in ref and len(parts) >= 2 else ref


def _codings(obj: Any, conv: Converter, element: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("coding", []), list):
        raise conv.fail("expected a CodeableConcept with a coding list", element)
    return [c for c in obj.get("coding", []) if isinstance(c, dict)]


def subject_reference(res: dict, conv: Converter) -> str:
    ref = _get(res, "subject.reference")
    if not isinstance(ref, str) or not ref:
        raise conv.fail("missing subject.reference to a Patient", "subject.reference")
    return ref


def family_of(event_id: str) -> str:
    return event_id.split("#", 1)[0]


def dedupe(events: list[FhirEvent], skipped: Counter) -> list[FhirEvent]:
    """Each resource's latest version in this input (by ``meta.lastUpdated``, then by
    place), and one event per (patient, time, code, value, text): a resource replayed
    under a new id is kept once.  Retractions of the winning version pass through."""
    latest: dict[tuple[str, str], tuple[int, int]] = {}
    for e in events:
        if e.event_id is not None:
            key = (e.patient, family_of(e.event_id))
            latest[key] = max(latest.get(key, e.version), e.version)
    seen: set[tuple] = set()
    kept = []
    for e in events:
        if e.event_id is not None and e.version != latest[(e.patient,
                                                            family_of(e.event_id))]:
            if not e.retract:
                skipped["an older version of a resource in the same input"] += 1
            continue
        if not e.retract:
            key = (e.patient, e.time, e.code, e.numeric_value, e.text_value)
            if key in seen:
                skipped["same patient, code, time and value as another event (kept once)"] += 1
                continue
            seen.add(key)
        kept.append(e)
    return kept


def bundle_to_events(bundle: Any, mapping: FhirMapping | None = None) -> FhirImport:
    """Convert one Bundle (transaction, batch or collection) into events per patient."""
    mapping = mapping or FhirMapping.default()
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError("expected a FHIR Bundle (resourceType 'Bundle')", element="resourceType")
    if bundle.get("type") not in ("transaction", "batch", "collection"):
        raise FhirError("Bundle.type must be transaction, batch or collection", element="type")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise FhirError("Bundle.entry must be a list", element="entry")
    out = FhirImport()
    conv = Converter(mapping, out)
    refs: dict[str, str] = {}  # references (Patient/<id>, urn:uuid:…) -> patient key
    keys: dict[int, str] = {}
    for i, e in enumerate(entries):
        res = e.get("resource") if isinstance(e, dict) else None
        conv.at(entry=i)
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise FhirError("entry without a resource (or its resourceType)", entry=i,
                            element="resource")
        kind = res["resourceType"]
        aliases = [a for a in (f"{kind}/{res['id']}" if isinstance(res.get("id"), str)
                               else None, e.get("fullUrl")) if isinstance(a, str) and a]
        if kind == "Patient":
            keys[i] = conv.patient(res).key
            for alias in aliases:
                refs[alias] = keys[i]
        elif kind == "Medication":
            for alias in aliases:
                conv.medications[alias] = res
    for i, e in enumerate(entries):
        res = e["resource"]
        kind = res["resourceType"]
        conv.at(entry=i)
        rid = f"{kind}/{res.get('id') or e.get('fullUrl') or i}"
        if kind == "Patient":
            start = len(out.events)
            conv.patient_events(res, keys[i], rid)
            conv.stamp(res, start, i)
            continue
        if kind not in USED:
            out.skipped[kind] += 1
            continue
        if kind == "Medication":
            continue
        ref = subject_reference(res, conv)
        patient = refs.get(ref) or refs.get(local_reference(ref))
        if patient is None:
            raise FhirError("subject refers to a Patient that is not in the bundle", entry=i,
                            element="subject.reference")
        conv.resource(res, patient, rid, i)
    out.events = dedupe(out.events, out.skipped)
    return out


def _identifiers(raw: Any, conv: Converter) -> list[tuple[str, str]]:
    """A Patient's (system, value) identifiers; those without a value are skipped."""
    if not isinstance(raw, list):
        raise conv.fail("Patient.identifier must be a list", "identifier")
    out = []
    for k, x in enumerate(raw):
        if not isinstance(x, dict):
            raise conv.fail("an identifier must be an object", f"identifier[{k}]")
        system, value = x.get("system", ""), x.get("value")
        if value is None:
            continue
        if not isinstance(system, str) or isinstance(value, bool) or not isinstance(
                value, str | int):
            raise conv.fail("identifier system and value must be strings",
                            f"identifier[{k}]")
        out.append((system, str(value)))
    return out


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

    mapping = mapping or FhirMapping.default()
    first = {}
    for kind, rules in (("Observation", mapping.observations),
                        ("Condition", mapping.conditions),
                        ("MedicationStatement", mapping.medications)):
        for r in rules:
            if r.to not in first and "*" not in r.code and r.value == "quantity":
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
                     "recordedDate": when(r.time)})
            else:
                add({"resourceType": "MedicationStatement", "id": rid, "status": "active",
                     "medicationCodeableConcept": coding, "subject": ref,
                     "effectiveDateTime": when(r.time)})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def import_to_frame(result: FhirImport, subject_of: dict[str, int]):
    """The events of an import as a MEDS frame, given each patient's subject id."""
    import numpy as np
    import pandas as pd

    ev = [e for e in result.events if not e.retract]
    return pd.DataFrame({
        "subject_id": np.array([subject_of[e.patient] for e in ev], dtype=np.int64),
        "time": pd.Series([e.time for e in ev], dtype="datetime64[us]"),
        "code": [e.code for e in ev],
        "numeric_value": np.array([np.nan if e.numeric_value is None else e.numeric_value
                                   for e in ev], dtype=np.float64),
        "text_value": pd.Series([e.text_value for e in ev], dtype=object),
    })
