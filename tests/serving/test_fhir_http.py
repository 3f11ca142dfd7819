"""FHIR over HTTP against the real service: bundles in, RiskAssessment out."""

from __future__ import annotations

import copy
import json

import pandas as pd
from fhir.resources.R4B.riskassessment import RiskAssessment

from features.fhir import bundle_to_events, import_to_frame
from tests.conftest import ROOT
from tests.serving.test_service import api_events

BUNDLES = ROOT / "examples" / "fhir"


def bundle(name: str) -> dict:
    return json.loads((BUNDLES / name).read_text())


def test_bundle_in_forecasts_out_and_resending_adds_nothing(server):
    b = bundle("ckd_patients.json")
    with server.client() as c:
        r = c.post("/v1/fhir", json=b)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["patients"]) == 4 and body["unmapped"] == {}
        sids = [p["subject_id"] for p in body["patients"]]
        assert len(set(sids)) == 4
        assert all(p["added"] > 0 and p["forecast"]["forecast_id"] for p in body["patients"])
        again = c.post("/v1/fhir", json=b).json()
        assert [p["subject_id"] for p in again["patients"]] == sids  # identifiers map back
        assert all(p["added"] == 0 for p in again["patients"])


def test_same_events_same_forecast_as_the_native_route(server):
    b = bundle("ckd_patients.json")
    with server.client() as c:
        fhir_side = c.post("/v1/fhir", json=b).json()["patients"][0]
        result = bundle_to_events(b)
        key = fhir_side["identifier"]
        frame = import_to_frame(result, {k: fhir_side["subject_id"] if k == key else -1
                                         for k in result.patients})
        frame = frame[frame["subject_id"] == fhir_side["subject_id"]]
        native = c.post("/v1/forecast", json={"events": api_events(frame),
                                               "subject_id": fhir_side["subject_id"]}).json()
    assert native["risks"] == fhir_side["forecast"]["risks"]
    assert native["as_of"] == fhir_side["forecast"]["as_of"]


def test_unit_conversion_and_unmapped_counts_over_http(server):
    with server.client() as c:
        body = c.post("/v1/fhir", json=bundle("hba1c_mmol.json")).json()
        sid = body["patients"][0]["subject_id"]
        values = c.get(f"/v1/twins/{sid}").json()["latest_values"]
    assert body["unmapped"] == {}  # total cholesterol (2093-3) is mapped
    assert body["report"]["mapped"]["LAB//CHOLESTEROL <- http://loinc.org|2093-3"] == 1
    assert body["skipped"] == {"AllergyIntolerance": 1}
    hba1c = next(v for v in values if v["code"] == "LAB//HBA1C")
    assert 3 < hba1c["numeric_value"] < 15  # percent, not mmol/mol


def test_a_malformed_bundle_is_a_422_naming_entry_and_element_and_stores_nothing(server):
    b = bundle("ckd_patients.json")
    for e in b["entry"]:
        e["resource"].setdefault("identifier", [])
    bad = copy.deepcopy(b)
    for e in bad["entry"]:  # fresh identifiers: these patients are new
        r = e["resource"]
        if r["resourceType"] == "Patient":
            r["identifier"] = [{"system": "urn:test:malformed", "value": r["id"]}]
    bad["entry"][-1]["resource"]["effectiveDateTime"] = "not a date"
    with server.client() as c:
        r = c.post("/v1/fhir", json=bad)
        assert r.status_code == 422
        err = r.json()
        assert err["fields"][0]["loc"][:2] == ["body", f"entry[{len(bad['entry']) - 1}]"]
        assert "not a valid FHIR date" in err["message"]
        for junk in (b"{", b"[1, 2]", b'{"resourceType": "Bundle"}'):
            assert c.post("/v1/fhir", content=junk).status_code == 422
        fixed = copy.deepcopy(bad)
        fixed["entry"].pop()
        ok = c.post("/v1/fhir", json=fixed).json()
    # nothing of the failed request was stored: everything is new on the second try
    assert all(p["duplicates"] == 0 for p in ok["patients"])


def test_risk_assessment_validates_and_names_the_served_version(server):
    with server.client() as c:
        body = c.post("/v1/fhir", json=bundle("ckd_patients.json")).json()
        p = next(p for p in body["patients"] if p["forecast"]["status"] == "ok")
        sid = p["subject_id"]
        model = c.get("/v1/model").json()
        r = c.get(f"/v1/twins/{sid}/forecast", params={"format": "fhir"})
        r2 = c.get(f"/v1/twins/{sid}/forecast",
                   headers={"accept": "application/fhir+json"})
        plain = c.get(f"/v1/twins/{sid}/forecast").json()
    assert r.status_code == 200 and r.headers["content-type"].startswith(
        "application/fhir+json")
    ra = RiskAssessment.model_validate(r.json())
    assert r2.json() == r.json()
    assert ra.method.coding[0].code == f"{model['name']}/{model['version']}"
    assert ra.subject.identifier.value == p["identifier"].split("|")[1]
    assert [float(pr.probabilityDecimal) for pr in ra.prediction] == [
        round(v, 6) for v in p["forecast"]["risks"].values()]
    assert [int(pr.whenRange.high.value) for pr in ra.prediction] == [365, 730]
    assert ra.basis and all(b.reference.startswith("Observation/") for b in ra.basis)
    assert pd.Timestamp(ra.occurrenceDateTime) == pd.Timestamp(plain["as_of"])
    assert "log-odds" in ra.note[0].text
    # trajectories travel in the note only: a forecast value is never an Observation
    median = plain["trajectories"][0]["median"]
    assert ra.note[1].text.startswith("Forecast, not a measurement: LAB//EGFR about 365")
    assert f"median {median:.1f}" in ra.note[1].text
