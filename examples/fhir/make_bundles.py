"""Build the shipped FHIR R4 test bundles from the synthetic cohort (no patient data).

    python examples/fhir/make_bundles.py     # -> examples/fhir/*.json

- ``ckd_patients.json``: 4 synthetic CKD patients, several years of labs (transaction).
- ``hba1c_mmol.json``: 1 patient whose HbA1c is reported in mmol/mol (IFCC), to be
  converted to % (NGSP); plus an Observation with a code twincast does not map, and an
  AllergyIntolerance resource it does not use (both counted, not dropped silently).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from features.fhir import events_to_bundle  # noqa: E402
from features.simulate import simulate_cohort  # noqa: E402


def main() -> None:
    ev = simulate_cohort(60, seed=42)
    long_lived = ev.groupby("subject_id")["time"].agg(lambda t: (t.max() - t.min()).days)
    keep = long_lived[long_lived > 3 * 365].index[:5]
    four = ev[ev["subject_id"].isin(keep[:4])]
    (HERE / "ckd_patients.json").write_text(json.dumps(events_to_bundle(four), indent=1))
    one = events_to_bundle(ev[ev["subject_id"] == keep[4]])
    for e in one["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "4548-4":
            pct = r["valueQuantity"]["value"]
            mmol = round((pct - 2.152) / 0.09148, 1)
            r["valueQuantity"] = {"value": mmol, "unit": "mmol/mol",
                                  "system": "http://unitsofmeasure.org", "code": "mmol/mol"}
    pid = one["entry"][0]["resource"]["id"]
    one["entry"].append({"fullUrl": "urn:uuid:obs-unmapped", "resource": {
        "resourceType": "Observation", "id": "unmapped-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2019-05-01T10:00:00+00:00",
        "valueQuantity": {"value": 190, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                          "code": "mg/dL"}}, "request": {"method": "PUT",
                                                          "url": "Observation/unmapped-1"}})
    one["entry"].append({"fullUrl": "urn:uuid:allergy-1", "resource": {
        "resourceType": "AllergyIntolerance", "id": "allergy-1",
        "patient": {"reference": f"Patient/{pid}"},
        "code": {"text": "penicillin"}}, "request": {"method": "PUT",
                                                     "url": "AllergyIntolerance/allergy-1"}})
    (HERE / "hba1c_mmol.json").write_text(json.dumps(one, indent=1))


if __name__ == "__main__":
    main()
