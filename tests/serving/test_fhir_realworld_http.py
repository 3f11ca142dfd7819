"""US Core data from an independent generator, through the real service (SQLite and
PostgreSQL): bundles and Bulk Data NDJSON in, every value stored, every patient
forecast, corrections applied, malformed resources refused whole."""

from __future__ import annotations

import copy
import json

from carebundle import (
    Imperfection,
    generate_bundle,
    generate_cohort,
    inject_defects,
    to_json,
    to_ndjson,
)

NDJSON = {"content-type": "application/fhir+ndjson"}


def bundle(seed: int, profile: str = "ckd_stage3", **kw) -> dict:
    return json.loads(to_json(generate_bundle(profile=profile, seed=seed, **kw)))


def systolic(b: dict) -> float:
    panel = next(e["resource"] for e in b["entry"]
                 if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") ==
                 "85354-9")
    return float(next(c["valueQuantity"]["value"] for c in panel["component"]
                      if c["code"]["coding"][0]["code"] == "8480-6"))


def observation(b: dict, loinc: str) -> dict:
    return next(e["resource"] for e in b["entry"]
                if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == loinc)


def latest(c, sid: int) -> dict[str, float]:
    twin = c.get(f"/v1/twins/{sid}").json()
    return {v["code"]: v["numeric_value"] for v in twin["latest_values"]}


PROFILES = ("anaemia", "ckd_stage3", "healthy", "hypertension", "type2_diabetes")


def test_every_patient_is_forecast_with_its_blood_pressure_and_labs(server):
    with server.client() as c:
        for seed in range(1000, 1010):
            profile = PROFILES[seed % len(PROFILES)]
            b = bundle(seed, profile=profile, sex="F" if seed % 2 else "M")
            r = c.post("/v1/fhir", json=b)
            assert r.status_code == 200, r.text
            body = r.json()
            (p,) = body["patients"]
            assert p["created"] and p["forecast"]["forecast_id"]
            assert p["forecast"]["status"] in ("ok", "not_eligible")
            values = latest(c, p["subject_id"])
            assert values["VITAL//SBP"] == systolic(b)
            assert values["LAB//EGFR"] == float(observation(b, "98979-8")["valueQuantity"]
                                                ["value"])
            assert values["LAB//UACR"] == float(observation(b, "9318-7")["valueQuantity"]
                                                ["value"])
            if profile == "ckd_stage3":
                assert any(k.startswith("DX//CKD_STAGE3") for k in values)
            cov = body["report"]["coverage"]
            assert cov["Condition"]["kept"] >= 1 and cov["Observation"]["kept"] >= 14


def test_ndjson_lines_on_the_fhir_and_bulk_routes(server):
    cohort = generate_cohort(count=4, seed=2024, prevalence={"type2_diabetes": 1.0})
    files = to_ndjson(cohort)
    lines = "\n".join(files[k] for k in ["Patient", *sorted(set(files) - {"Patient"})])
    with server.client() as c:
        r = c.post("/v1/fhir", content=lines.encode(), headers=NDJSON)
        assert r.status_code == 200, r.text
        first = r.json()
        assert len(first["patients"]) == 4 and all(p["created"] for p in first["patients"])
        assert all(p["added"] > 10 for p in first["patients"])
        again = c.post("/v1/twins:bulk", content=lines.encode(), headers=NDJSON)
        assert again.status_code == 200, again.text
        body = again.json()
        assert sorted(t["subject_id"] for t in body["twins"]) == sorted(
            p["subject_id"] for p in first["patients"])  # the same patients, by identifier
        assert body["events_added"] == 0 and all(t["duplicates"] > 0 for t in body["twins"])
        assert body["report"]["patients"] == 4
        bad = lines + "\n{not json"
        r = c.post("/v1/twins:bulk", content=bad.encode(), headers=NDJSON)
        assert r.status_code == 422 and "line" in r.json()["message"]
        r = c.post("/v1/fhir", content=files["Observation"].encode(), headers=NDJSON)
        assert r.status_code == 422  # references to Patients the body does not hold
        assert "line 1" in r.json()["message"]


def test_a_malformed_resource_is_a_422_naming_the_entry_and_nothing_is_stored(server):
    clean = bundle(2100, profile="type2_diabetes")
    for seed in range(60):
        dirty, defects = inject_defects(clean, Imperfection(missing_field=0.05), seed=seed)
        fatal = [d for d in defects if d.detail == "removed 'status'"
                 and d.resource_type in ("Observation", "MedicationRequest")]
        if fatal:
            break
    assert fatal
    with server.client() as c:
        r = c.post("/v1/fhir", json=dirty)
        assert r.status_code == 422, r.text
        loc = r.json()["fields"][0]["loc"]
        assert loc[0] == "body" and loc[1] in {f"entry[{d.entry_index}]" for d in fatal}
        assert loc[2] == "status"
        ok = c.post("/v1/fhir", json=clean).json()
    assert ok["patients"][0]["created"]  # the refused bundle left no twin behind
    assert ok["patients"][0]["duplicates"] == 0


def test_the_report_names_the_features_no_input_feeds(server):
    with server.client() as c:
        body = c.post("/v1/fhir", json=bundle(2200, include_vitals=False)).json()
        fed = c.post("/v1/fhir", json=bundle(2201)).json()
    starved = {s["code"]: s for s in body["report"]["starved"]}
    assert "VITAL//SBP" in starved and starved["VITAL//SBP"]["features"]
    assert all(f.startswith("VITAL//SBP__") for f in starved["VITAL//SBP"]["features"])
    assert "VITAL//SBP" not in {s["code"] for s in fed["report"]["starved"]}


def test_a_corrected_observation_replaces_its_value_and_a_retraction_takes_it_back(server):
    b = bundle(2300)
    for e in b["entry"]:  # ids as a FHIR server assigns them: versions of one resource
        e["resource"]["id"] = e["fullUrl"].rsplit(":", 1)[1]
    with server.client() as c:
        sid = c.post("/v1/fhir", json=b).json()["patients"][0]["subject_id"]
        before = latest(c, sid)
        fixed = copy.deepcopy(b)
        egfr = observation(fixed, "98979-8")
        egfr["status"] = "corrected"
        egfr["valueQuantity"]["value"] = before["LAB//EGFR"] - 7
        r = c.post("/v1/fhir", json=fixed).json()["patients"][0]
        assert r["superseded"] == 1 and r["added"] == 1
        assert latest(c, sid)["LAB//EGFR"] == before["LAB//EGFR"] - 7
        forecasts = c.get(f"/v1/twins/{sid}/forecasts").json()["total"]
        for resend in (fixed, b):  # either version again: a re-send, nothing changes
            again = c.post("/v1/fhir", json=resend).json()["patients"][0]
            assert again["added"] == 0 and again["superseded"] == 0
        assert c.get(f"/v1/twins/{sid}/forecasts").json()["total"] == forecasts
        assert latest(c, sid)["LAB//EGFR"] == before["LAB//EGFR"] - 7
        gone = copy.deepcopy(fixed)
        observation(gone, "98979-8")["status"] = "entered-in-error"
        r = c.post("/v1/fhir", json=gone).json()["patients"][0]
        assert r["superseded"] == 1
        assert "LAB//EGFR" not in latest(c, sid)


def test_hostile_ndjson_bodies_get_4xx_never_500(server):
    patient = json.dumps({"resourceType": "Patient", "id": "h1",
                          "identifier": [{"system": "urn:hostile", "value": "h1"}]})

    def obs(**over):
        res = {"resourceType": "Observation", "id": "o", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
               "subject": {"reference": "Patient/h1"},
               "effectiveDateTime": "2020-01-01T00:00:00Z",
               "valueQuantity": {"value": 40, "system": "http://unitsofmeasure.org",
                                 "code": "mL/min/{1.73_m2}"}}
        res.update(over)
        return json.dumps(res)

    bodies = [
        patient + "\n" + "[" * 5000 + "]" * 5000,  # nested far too deep
        patient + "\n" + obs(effectiveDateTime="9999-12-31T23:59:59-23:59"),  # huge offset
        patient + "\n" + obs(effectiveDateTime="0001-01-01T00:00:00+23:59"),
        patient + "\n" + obs(valueQuantity={"value": 1e308 * 10}),
        patient + "\n[1, 2]",
        patient + "\n" + obs(subject={"reference": "Patient/" + "9" * 5000}),
        b"\xff\xfe not utf-8",
    ]
    with server.client() as c:
        for route in ("/v1/fhir", "/v1/twins:bulk"):
            for body in bodies:
                raw = body if isinstance(body, bytes) else body.encode()
                r = c.post(route, content=raw, headers=NDJSON)
                assert 400 <= r.status_code < 500, (route, r.status_code, r.text[:200])
                assert r.headers["content-type"].startswith("application/json")
