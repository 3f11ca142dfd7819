"""FHIR as US Core senders write it, checked against an independent generator.

``carebundle`` writes US Core 6.1.0 conformant R4 bundles and Bulk Data NDJSON for five
clinical profiles; its values are read here straight from its JSON (not through the
importer) and must all land with the right value and unit.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections import Counter

import pandas as pd
import pytest
from carebundle import (
    Imperfection,
    generate_bundle,
    generate_cohort,
    inject_defects,
    to_json,
    to_ndjson,
)

from features.events import read_events
from features.fhir import FhirError, FhirMapping, bundle_to_events, import_to_frame
from features.fhir_bulk import ndjson_to_meds

PROFILES = ("anaemia", "ckd_stage3", "healthy", "hypertension", "type2_diabetes")
LOINC = "http://loinc.org"
# the four quantities the embedded task reads, by the LOINC codes carebundle sends them in
ANALYTES = {"98979-8": "LAB//EGFR", "4548-4": "LAB//HBA1C", "9318-7": "LAB//UACR",
            "8480-6": "VITAL//SBP"}
UNITS = {"LAB//EGFR": "mL/min/{1.73_m2}", "LAB//HBA1C": "%", "LAB//UACR": "mg/g",
         "VITAL//SBP": "mm[Hg]"}


def naive(*parts: int) -> dt.datetime:
    """A naive-UTC time, as events hold them."""
    return dt.datetime(*parts, tzinfo=dt.UTC).replace(tzinfo=None)


def bundles(profile: str, n: int = 6, seed: int = 7) -> list[dict]:
    return [json.loads(to_json(generate_bundle(profile=profile, seed=seed * 100 + k,
                                               sex="F" if k % 2 else "M")))
            for k in range(n)]


def raw_values(bundle: dict) -> Counter:
    """(code, time, value) of every analyte value in the bundle, read from its JSON."""
    found: Counter = Counter()
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] != "Observation":
            continue
        for node in [r, *r.get("component", [])]:
            code = node["code"]["coding"][0]["code"]
            if code in ANALYTES and "valueQuantity" in node:
                q = node["valueQuantity"]
                assert q["system"] == "http://unitsofmeasure.org"
                assert q["code"] == UNITS[ANALYTES[code]]  # as the mapping stores it
                found[(ANALYTES[code], r["effectiveDateTime"], float(q["value"]))] += 1
    return found


def kept_values(result) -> Counter:
    return Counter((e.code, e.time.strftime("%Y-%m-%dT%H:%M:%SZ"), e.numeric_value)
                   for e in result.events if e.code in UNITS)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_analyte_value_lands_with_its_value_and_unit(profile):
    mapping = FhirMapping.load()
    for b in bundles(profile):
        want = raw_values(b)
        assert any(code == "VITAL//SBP" for code, _, _ in want)  # from the BP panel
        result = bundle_to_events(b, mapping)
        assert kept_values(result) == want
        assert mapping.units()["VITAL//SBP"] == "mm[Hg]"
        # and the diastolic beside it, from the same panel
        assert sum(e.code == "VITAL//DBP" for e in result.events) == sum(
            code == "VITAL//SBP" for code, _, _ in want)


@pytest.mark.parametrize("profile", PROFILES)
def test_values_sent_are_kept_unmapped_or_counted_never_lost(profile):
    """Per resource type: values sent = events kept + unmapped + skipped by a rule."""
    for b in bundles(profile, n=4):
        result = bundle_to_events(b)
        kept = result.kept()
        unmapped = Counter(k.split(" ", 1)[0] for k in result.unmapped.elements())
        for kind, sent in result.sent.items():
            assert kept[kind] + unmapped[kind] + sum(
                v for k, v in result.skipped.items() if k.startswith(kind + " (")
            ) + (sum(v for k, v in result.skipped.items() if k.startswith("same patient"))
                 if kind.startswith("Medication") or kind == "Condition" else 0) \
                == sent, (profile, kind)


def test_unmapped_codes_are_the_expected_ones():
    """ckd_stage3: the labs twincast has no code for, each once per patient; every stage
    diagnosis, hypertension and both antihypertensive orders mapped."""
    result = None
    total = Counter()
    for b in bundles("ckd_stage3", n=5):
        result = bundle_to_events(b)
        total.update(result.unmapped)
    obs = {k.split("|")[1] for k in total if k.startswith("Observation")}
    assert obs == {"14957-5", "1742-6", "1751-7", "17861-6", "1920-8", "1975-2", "2028-9",
                   "2075-0", "2085-9", "2571-8", "2951-2", "3094-0", "4544-3", "59408-5",
                   "6690-2", "6768-6", "777-3", "789-8", "8302-2", "8310-5", "9279-1"}
    assert all(total[f"Observation {LOINC}|{c}"] == 5 for c in obs)
    assert not any(k.startswith("Condition http://hl7.org/fhir/sid/icd-10-cm|N18")
                   for k in total)


def test_icd10_hierarchy_keeps_the_ckd_stage():
    b = bundles("ckd_stage3", n=1)[0]
    cond = next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] ==
                "Condition" and e["resource"]["code"]["coding"][0]["code"].startswith("N18"))
    for sent, want in [("N18.31", "DX//CKD_STAGE3A"), ("N18.32", "DX//CKD_STAGE3B"),
                       ("N1832", "DX//CKD_STAGE3B"), ("n18.4", "DX//CKD_STAGE4"),
                       ("N18.30", "DX//CKD_STAGE3"), ("N18.39", "DX//CKD_STAGE3"),
                       ("N18.9", "DX//CKD"), ("N18.6", "DX//ESKD")]:
        cond["code"]["coding"][0]["code"] = sent
        codes = {e.code for e in bundle_to_events(b).events}
        assert want in codes and not (codes & {"DX//CKD", "DX//CKD_STAGE3"} - {want}), sent


def test_condition_verification_and_time_rules():
    b = bundles("hypertension", n=1)[0]
    cond = next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] ==
                "Condition" and e["resource"]["code"]["coding"][0]["code"] == "I10")

    def htn(res):
        return [e for e in bundle_to_events(b).events if e.code == "DX//HYPERTENSION"]

    cond["recordedDate"] = "2025-03-04"
    assert [e.time for e in htn(b)] == [naive(2025, 3, 4)]  # when the chart knew it
    del cond["recordedDate"]
    assert [e.time.date() for e in htn(b)] == [dt.date.fromisoformat(cond["onsetDateTime"][:10])]
    for status, kept in [("refuted", False), ("entered-in-error", False),
                         ("provisional", False), ("confirmed", True)]:
        cond["verificationStatus"] = {"coding": [{"code": status}]}
        assert bool(htn(b)) is kept, status
    cond["clinicalStatus"] = {"coding": [{"code": "resolved"}]}
    assert htn(b)  # a resolved problem was still diagnosed


def test_medications_map_at_clinical_drug_level_with_status_and_references():
    b = bundles("hypertension", n=1)[0]
    reqs = [e["resource"] for e in b["entry"]
            if e["resource"]["resourceType"] == "MedicationRequest"]
    assert reqs
    classes = {e.code for e in bundle_to_events(b).events if e.code.startswith("RX//")}
    assert classes and classes <= {"RX//ACEI", "RX//ARB", "RX//CCB", "RX//THIAZIDE",
                                   "RX//BETA_BLOCKER", "RX//STATIN"}
    lisinopril = {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                              "code": "314076"}]}  # lisinopril 10 MG Oral Tablet (SCD)
    reqs[0]["medicationCodeableConcept"] = lisinopril
    assert "RX//ACEI" in {e.code for e in bundle_to_events(b).events}
    # by reference to a Medication resource in the bundle
    del reqs[0]["medicationCodeableConcept"]
    reqs[0]["medicationReference"] = {"reference": "urn:uuid:med-1"}
    b["entry"].append({"fullUrl": "urn:uuid:med-1",
                       "resource": {"resourceType": "Medication", "code": lisinopril}})
    assert "RX//ACEI" in {e.code for e in bundle_to_events(b).events}
    for status, intent, kept in [("cancelled", "order", False), ("draft", "order", False),
                                 ("active", "proposal", False), ("stopped", "order", True)]:
        reqs[0].update(status=status, intent=intent)
        assert ("RX//ACEI" in {e.code for e in bundle_to_events(b).events}) is kept
    reqs[0].update(status="entered-in-error", id="rx-1")
    assert any(e.retract for e in bundle_to_events(b).events)


def test_observation_status_units_and_value_types():
    b = bundles("type2_diabetes", n=1)[0]
    hba1c = next(e["resource"] for e in b["entry"]
                 if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "4548-4")
    glucose = next(e["resource"] for e in b["entry"]
                   if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") ==
                   "2345-7")

    def value(code):
        return [e.numeric_value for e in bundle_to_events(b).events if e.code == code]

    # converted by the UCUM code; the display unit is never read
    glucose["valueQuantity"] = {"value": 7.0, "unit": "mg/dL",
                                "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    assert value("LAB//GLUCOSE") == [pytest.approx(7.0 * 18.016)]
    glucose["valueQuantity"]["code"] = "mmol/mol"  # a unit the rule does not know
    result = bundle_to_events(b)
    assert result.unmapped[f"Observation {LOINC}|2345-7 unit mmol/mol"] == 1
    del glucose["valueQuantity"]["code"]
    assert bundle_to_events(b).unmapped[
        f"Observation {LOINC}|2345-7 without a UCUM unit code"] == 1
    for status, stored in [("entered-in-error", False), ("cancelled", False),
                           ("registered", False), ("preliminary", True), ("amended", True),
                           ("corrected", True)]:
        hba1c["status"] = status
        assert bool(value("LAB//HBA1C")) is stored, status
    hba1c["status"] = "entered-in-error"  # no resource id: nothing it could take back
    assert bundle_to_events(b).skipped[
        "retraction without a resource id (nothing to take back)"] == 1
    hba1c["id"] = "hba1c-1"  # with its id, it takes back what that resource stored
    assert [e.event_id for e in bundle_to_events(b).events if e.retract] == [
        "Observation/hba1c-1"]
    hba1c["status"] = "final"
    assert [e.event_id for e in bundle_to_events(b).events if e.code == "LAB//HBA1C"] == [
        "Observation/hba1c-1"]  # its logical id: a later version replaces it
    hba1c["status"] = "final"
    # a time from effectivePeriod, else from issued
    when = hba1c.pop("effectiveDateTime")
    hba1c["issued"] = "2025-06-01T08:00:00Z"
    assert [e.time for e in bundle_to_events(b).events if e.code == "LAB//HBA1C"] == [
        naive(2025, 6, 1, 8)]
    hba1c["effectivePeriod"] = {"start": when}
    assert [e.time for e in bundle_to_events(b).events if e.code == "LAB//HBA1C"] == [
        dt.datetime.fromisoformat(when.replace("Z", "+00:00")).replace(tzinfo=None)]
    # a coded value where the rule names one
    hba1c.clear()
    hba1c.update({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": LOINC, "code": "72166-2"}]},
                  "subject": glucose["subject"], "effectiveDateTime": when,
                  "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct",
                                                       "code": "8517006"}]}})
    smoking = [e for e in bundle_to_events(b).events if e.code == "SOCIAL//SMOKING"]
    assert [e.text_value for e in smoking] == ["former"]


@pytest.mark.parametrize("profile", PROFILES)
def test_bulk_ndjson_gives_the_same_events_as_the_bundles(profile, tmp_path):
    cohort = generate_cohort(count=6, seed=11, prevalence={profile: 1.0})
    export = tmp_path / "export"
    export.mkdir()
    for kind, lines in to_ndjson(cohort).items():
        (export / f"{kind}.ndjson").write_text(lines)
    got = ndjson_to_meds([export], tmp_path / "meds")
    assert len(got.subject_of) == 6 and got.kept["Observation"] > 0
    # the same resources as bundles, through the bundle path
    frames, ids = [], {}
    for b in cohort:
        result = bundle_to_events(json.loads(to_json(b)))
        for key in result.patients:
            ids.setdefault(key, 1 + len(ids))
        frames.append(import_to_frame(result, ids))
    from features.events import events_from_frame

    want = events_from_frame(pd.concat(frames, ignore_index=True))
    pd.testing.assert_frame_equal(read_events(tmp_path / "meds").reset_index(drop=True),
                                  want.reset_index(drop=True))
    assert got.report.sent["Observation"] >= got.kept["Observation"]


def test_bulk_ndjson_keeps_each_resources_latest_line_and_names_bad_lines(tmp_path):
    cohort = generate_cohort(count=2, seed=3, prevalence={"ckd_stage3": 1.0})
    files = to_ndjson(cohort)
    export = tmp_path / "export"
    export.mkdir()
    obs = [json.loads(x) for x in files["Observation"].splitlines()]
    egfr = next(o for o in obs if o["code"]["coding"][0]["code"] == "98979-8")
    corrected = copy.deepcopy(egfr)
    corrected.update(status="corrected")
    corrected["valueQuantity"]["value"] = 11.0
    wrong = next(o for o in obs if o["code"]["coding"][0]["code"] == "4548-4")
    retracted = {**copy.deepcopy(wrong), "status": "entered-in-error"}
    lines = [*files["Observation"].splitlines(), json.dumps(corrected), json.dumps(retracted)]
    for kind, text in files.items():
        (export / f"{kind}.ndjson").write_text("\n".join(lines) if kind == "Observation"
                                               else text)
    ndjson_to_meds([export], tmp_path / "meds")
    ev = read_events(tmp_path / "meds")
    egfr_values = ev.loc[ev["code"].astype(str) == "LAB//EGFR", "numeric_value"].tolist()
    assert 11.0 in egfr_values and float(egfr["valueQuantity"]["value"]) not in egfr_values
    assert (ev["code"].astype(str) == "LAB//HBA1C").sum() == 1  # one of two taken back
    (export / "Observation.ndjson").write_text(files["Observation"] + "\n{not json\n")
    with pytest.raises(FhirError, match=r"Observation.ndjson line \d+: not JSON"):
        ndjson_to_meds([export], tmp_path / "meds2")
    assert not (tmp_path / "meds2").exists()  # nothing half-written


def test_defect_injection_malformed_resources_name_the_entry_the_rest_are_counted():
    clean = bundles("type2_diabetes", n=1)[0]
    mapping = FhirMapping.load()
    obs_index = mapping.index("observations")
    read = {"Observation", "MedicationRequest"}
    hits = 0
    for seed in range(40):
        dirty, defects = inject_defects(clean, Imperfection(missing_field=0.05), seed=seed)
        fatal = [d for d in defects if d.detail == "removed 'status'"
                 and d.resource_type in read]
        if not fatal:
            bundle_to_events(dirty)  # text, category, encounter: not needed
            continue
        hits += 1
        with pytest.raises(FhirError) as info:
            bundle_to_events(dirty)
        assert info.value.entry in {d.entry_index for d in fatal}
        assert info.value.element == "status"
    assert hits > 5
    dirty, defects = inject_defects(clean, Imperfection(unparseable_value=0.3), seed=5)
    on_mapped = [d for d in defects if obs_index.best(
        clean["entry"][d.entry_index]["resource"]["code"]["coding"])[0] is not None]
    result = bundle_to_events(dirty)
    assert on_mapped and sum(v for k, v in result.unmapped.items()
                             if "valueString where a quantity is expected" in k) == len(on_mapped)
    dirty, defects = inject_defects(clean, Imperfection(duplicate_entry=0.5), seed=2)
    assert defects
    assert Counter((e.code, e.time, e.numeric_value) for e in bundle_to_events(dirty).events
                   if not e.retract) == Counter((e.code, e.time, e.numeric_value)
                                                for e in bundle_to_events(clean).events)
    dirty, defects = inject_defects(clean, Imperfection(unknown_code_system=0.2), seed=4)
    result = bundle_to_events(dirty)
    coded = [d for d in defects if d.resource_type in ("Observation", "Condition")]
    assert coded and sum(v for k, v in result.unmapped.items()
                         if "urn:oid:1.2.840.114350" in k) == len(coded)


@pytest.mark.parametrize(("loinc", "unit", "sent", "stored", "code"), [
    ("9318-7", "mg/mmol", 3.0, 3.0 * 8.84, "LAB//UACR"),
    ("2160-0", "umol/L", 120.0, 120.0 * 0.011312, "LAB//CREATININE"),
    ("4548-4", "mmol/mol", 53.0, 53.0 * 0.09148 + 2.152, "LAB//HBA1C"),
    ("718-7", "g/L", 131.0, 13.1, "LAB//HEMOGLOBIN"),
    ("98979-8", "mL/min/1.73.m2", 41.0, 41.0, "LAB//EGFR"),
])
def test_quantities_are_converted_by_their_ucum_code(loinc, unit, sent, stored, code):
    b = bundles("ckd_stage3", n=1)[0]
    obs = next(e["resource"] for e in b["entry"]
               if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == loinc)
    obs["valueQuantity"] = {"value": sent, "unit": "whatever the display says",
                            "system": "http://unitsofmeasure.org", "code": unit}
    assert [e.numeric_value for e in bundle_to_events(b).events if e.code == code] == [
        pytest.approx(stored)]


def test_each_clinical_drug_maps_to_its_ingredient_class():
    table = {"197361": "RX//CCB", "310798": "RX//THIAZIDE", "314076": "RX//ACEI",
             "979492": "RX//ARB", "1545658": "RX//SGLT2", "861007": "RX//METFORMIN",
             "617310": "RX//STATIN", "200032": "RX//BETA_BLOCKER"}
    seen = set()
    for profile in PROFILES:
        for b in bundles(profile, n=4):
            events = bundle_to_events(b).events
            for e in b["entry"]:
                r = e["resource"]
                if r["resourceType"] != "MedicationRequest":
                    continue
                rxcui = r["medicationCodeableConcept"]["coding"][0]["code"]
                if rxcui in table:
                    seen.add(rxcui)
                    assert table[rxcui] in {ev.code for ev in events}, rxcui
    assert len(seen) >= 4  # the generator prescribes several of them


def test_a_new_version_that_yields_nothing_takes_back_the_old_one():
    b = bundles("hypertension", n=1)[0]
    cond = next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] ==
                "Condition" and e["resource"]["code"]["coding"][0]["code"] == "I10")
    cond["id"] = "htn-1"
    cond["verificationStatus"] = {"coding": [{"code": "refuted"}]}
    (gone,) = [e for e in bundle_to_events(b).events if e.event_id == "Condition/htn-1"]
    assert gone.retract
    egfr = next(e["resource"] for e in b["entry"]
                if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") ==
                "98979-8")
    egfr.update(id="egfr-1", status="amended")
    egfr["valueQuantity"]["code"] = "mL/s"  # amended into a unit the mapping cannot read
    (gone,) = [e for e in bundle_to_events(b).events if e.event_id == "Observation/egfr-1"]
    assert gone.retract


def test_two_versions_in_one_input_keep_the_latest():
    b = bundles("ckd_stage3", n=1)[0]
    egfr = next(e for e in b["entry"]
                if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") ==
                "98979-8")
    egfr["resource"]["id"] = "egfr-1"
    newer = copy.deepcopy(egfr)
    newer["resource"]["valueQuantity"]["value"] = 12.0
    newer["resource"]["meta"] = {"lastUpdated": "2026-02-01T00:00:00Z"}
    egfr["resource"]["meta"] = {"lastUpdated": "2026-01-15T00:00:00Z"}
    b["entry"].insert(0, newer)  # first in place, latest by lastUpdated
    result = bundle_to_events(b)
    assert [e.numeric_value for e in result.events if e.code == "LAB//EGFR"] == [12.0]
    assert result.skipped["an older version of a resource in the same input"] == 1
    del newer["resource"]["meta"], egfr["resource"]["meta"]  # no lastUpdated: by place
    assert [e.numeric_value for e in bundle_to_events(b).events if e.code == "LAB//EGFR"] \
        == [float(egfr["resource"]["valueQuantity"]["value"])]


def test_references_contained_drugs_and_missing_dates():
    b = bundles("hypertension", n=1)[0]
    patient = next(e for e in b["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["id"] = "p1"
    req = next(e["resource"] for e in b["entry"]
               if e["resource"]["resourceType"] == "MedicationRequest")
    req["subject"] = {"reference": "https://ehr.example/fhir/Patient/p1/_history/3"}
    req["contained"] = [{"resourceType": "Medication", "id": "m",
                         "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/"
                                              "umls/rxnorm", "code": "314076"}]}}]
    del req["medicationCodeableConcept"]
    req["medicationReference"] = {"reference": "#m"}
    assert "RX//ACEI" in {e.code for e in bundle_to_events(b).events}
    req["doNotPerform"] = True
    result = bundle_to_events(b)
    assert "RX//ACEI" not in {e.code for e in result.events}
    assert result.skipped["MedicationRequest (doNotPerform)"] == 1
    cond = next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] ==
                "Condition")
    cond.pop("onsetDateTime", None)
    cond.pop("recordedDate", None)
    cond["onsetString"] = "in childhood"
    result = bundle_to_events(b)  # counted, the rest of the bundle stands
    assert result.skipped["Condition without recordedDate or a dated onset"] == 1
    assert any(e.code == "LAB//EGFR" for e in result.events)


def test_numbers_out_of_range_are_refused_by_entry():
    b = bundles("ckd_stage3", n=1)[0]
    i, egfr = next((i, e["resource"]) for i, e in enumerate(b["entry"])
                   if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") ==
                   "98979-8")
    for value, message in [(10**400, "outside the representable range"),
                           (1e39, "outside the float32 range")]:
        egfr["valueQuantity"]["value"] = value
        with pytest.raises(FhirError, match=message) as info:
            bundle_to_events(b)
        assert info.value.entry == i


def test_ndjson_lines_split_at_newlines_only_and_are_capped():
    from features.fhir_bulk import TooManyLines, lines_to_bundle

    text = "\ufeff" + json.dumps({"resourceType": "Patient", "id": "a",
                                  "name": [{"text": "x\u2028y"}]}, ensure_ascii=False)
    text += "\n\n" + json.dumps({"resourceType": "Patient", "id": "b"}) + "\n"
    bundle = lines_to_bundle(text.encode(), max_entries=2)
    assert [e["line"] for e in bundle["entry"]] == [1, 3]
    assert bundle["entry"][0]["resource"]["name"][0]["text"] == "x\u2028y"
    with pytest.raises(TooManyLines):
        lines_to_bundle(text.encode(), max_entries=1)


def test_a_time_moved_into_the_future_is_refused_by_entry():
    now = dt.datetime.now(dt.UTC)
    clean = json.loads(to_json(generate_bundle(profile="healthy", seed=5,
                                               reference_date=dt.date(now.year, 1, 1))))
    dirty, defects = inject_defects(clean, Imperfection(out_of_order_timestamp=0.3), seed=1)
    read = [d for d in defects if d.resource_type == "Observation"]
    assert read  # each moved a year on, into next year
    with pytest.raises(FhirError, match="time is in the future") as info:
        bundle_to_events(dirty)
    assert info.value.entry in {d.entry_index for d in read}
