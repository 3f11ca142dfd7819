"""FHIR R4 bundles to MEDS and back, checked by a FHIR library no one here wrote."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
from fhir.resources.R4B.bundle import Bundle

from features.events import events_from_frame
from features.fhir import FhirError, bundle_to_events, events_to_bundle, import_to_frame
from features.simulate import simulate_cohort
from tests.conftest import ROOT

BUNDLES = ROOT / "examples" / "fhir"


def load(name: str) -> dict:
    return json.loads((BUNDLES / name).read_text())


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    ev = events_from_frame(frame.assign(code=frame["code"].astype(str)))
    return ev.assign(code=ev["code"].astype(str))


def test_round_trip_meds_to_fhir_and_back_keeps_every_mapped_event():
    ev = simulate_cohort(12, seed=9)
    bundle = json.loads(json.dumps(events_to_bundle(ev)))
    Bundle.model_validate(bundle)  # a valid R4 bundle, by fhir.resources
    result = bundle_to_events(bundle)
    assert result.unmapped == {} and len(result.patients) == 12
    back = canonical(import_to_frame(result, {k: int(k.split("|")[1]) for k in result.patients}))
    original = canonical(ev[ev["code"].astype(str) != "ADMIN//END_OF_FOLLOWUP"])
    pd.testing.assert_frame_equal(back, original)


def test_shipped_bundles_validate():
    for name in ("ckd_patients.json", "hba1c_mmol.json"):
        assert Bundle.model_validate(load(name)).type == "transaction"


def test_hba1c_in_mmol_per_mol_is_converted_to_percent():
    bundle = load("hba1c_mmol.json")
    raw = [e["resource"]["valueQuantity"]["value"] for e in bundle["entry"]
           if e["resource"]["resourceType"] == "Observation"
           and e["resource"]["code"]["coding"][0]["code"] == "4548-4"]
    assert raw and all(v > 20 for v in raw)  # mmol/mol
    events = [e for e in bundle_to_events(bundle).events if e.code == "LAB//HBA1C"]
    assert [round(e.numeric_value, 3) for e in events] == [round(0.09148 * v + 2.152, 3)
                                                         for v in raw]
    assert all(3 < e.numeric_value < 15 for e in events)  # percent


def test_unmapped_codes_and_resources_are_counted_not_dropped():
    bundle = load("hba1c_mmol.json")
    result = bundle_to_events(bundle)
    assert result.mapped["LAB//CHOLESTEROL <- http://loinc.org|2093-3"] == 1
    assert result.unmapped == {} and result.skipped == {"AllergyIntolerance": 1}
    chol = next(e["resource"] for e in bundle["entry"]
                if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "2093-3")
    chol["code"]["coding"][0]["code"] = "2951-2"  # sodium: twincast has no code for it
    result = bundle_to_events(bundle)
    assert result.unmapped == {"Observation http://loinc.org|2951-2": 1}
    assert "LAB//CHOLESTEROL" not in {e.code for e in result.events}


def broken(mutate) -> dict:
    bundle = copy.deepcopy(load("ckd_patients.json"))
    mutate(bundle)
    return bundle


def first_obs(bundle: dict) -> dict:
    return next(e["resource"] for e in bundle["entry"]
                if e["resource"]["resourceType"] == "Observation")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b.update(resourceType="Patient"), "resourceType: expected a FHIR Bundle"),
        (lambda b: b.update(type="document"), "type: Bundle.type must be"),
        (lambda b: first_obs(b).pop("subject"), "subject.reference: missing"),
        (lambda b: first_obs(b).update(effectiveDateTime="2020-13-45T00:00:00Z"),
         "effectiveDateTime: not a valid FHIR date"),
        (lambda b: first_obs(b).update(effectiveDateTime="2020-01-01T10:00:00"),
         "effectiveDateTime: a FHIR dateTime with a time needs a time zone"),
        (lambda b: first_obs(b).update(effectiveDateTime="2999-01-01T10:00:00Z"),
         "effectiveDateTime: time is in the future"),
        (lambda b: first_obs(b)["valueQuantity"].update(value="high"),
         "valueQuantity.value: expected valueQuantity with a numeric value"),
        (lambda b: first_obs(b)["subject"].update(reference="Patient/nobody"),
         "subject.reference: subject refers to a Patient that is not in the bundle"),
        (lambda b: b["entry"].append({"fullUrl": "x"}), "resource: entry without a resource"),
    ],
)
def test_malformed_bundles_name_the_entry_and_element(mutate, needle):
    with pytest.raises(FhirError) as info:
        bundle_to_events(broken(mutate))
    assert needle in str(info.value)
    if info.value.entry is not None:
        assert str(info.value).startswith(f"entry[{info.value.entry}]")
