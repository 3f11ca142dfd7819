"""FHIR mapping coverage on data from an independent generator (not a timed test).

    python bench/fhir_coverage.py [--count 20] [--seed 7]

For each of ``carebundle``'s profiles (US Core 6.1.0 R4 transaction bundles), counts the
clinical values sent — each Observation value or component value, each Condition and
medication order, each Patient's sex and birth date — and the events twincast keeps from
them, per resource type: events kept / values sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = ("anaemia", "ckd_stage3", "healthy", "hypertension", "type2_diabetes")


def values_sent(bundle: dict) -> Counter:
    sent: Counter = Counter()
    for e in bundle.get("entry", []):
        r = e["resource"]
        kind = r["resourceType"]
        if kind == "Observation":
            sent[kind] += len(r.get("component") or []) or 1
        elif kind in ("Condition", "MedicationRequest", "MedicationStatement"):
            sent[kind] += 1
        elif kind == "Patient":
            sent[kind] += ("gender" in r) + ("birthDate" in r) + ("deceasedDateTime" in r)
    return sent


ANALYTES = {"98979-8": "LAB//EGFR", "4548-4": "LAB//HBA1C", "9318-7": "LAB//UACR",
            "8480-6": "VITAL//SBP"}


def analytes_sent(bundle: dict) -> Counter:
    """The four quantities the embedded task reads (eGFR, HbA1c, UACR, systolic BP)."""
    sent: Counter = Counter()
    for e in bundle.get("entry", []):
        r = e["resource"]
        if r["resourceType"] == "Observation":
            for node in [r, *r.get("component", [])]:
                code = node["code"]["coding"][0]["code"]
                if code in ANALYTES and "valueQuantity" in node:
                    sent[ANALYTES[code]] += 1
    return sent


def events_kept(result) -> Counter:
    kept: Counter = Counter()
    for ev in result.events:
        kept[ev.source.split("/", 1)[0]] += 1
    return kept


def main() -> None:
    from carebundle import generate_bundle, to_json

    from features.fhir import bundle_to_events

    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    total_sent, total_kept = Counter(), Counter()
    a_sent, a_kept = Counter(), Counter()
    print(f"{'profile':<16}{'resource':<20}{'sent':>6}{'kept':>6}{'coverage':>10}")
    for profile in PROFILES:
        sent, kept = Counter(), Counter()
        for k in range(args.count):
            bundle = json.loads(to_json(generate_bundle(
                profile=profile, seed=args.seed * 1000 + k, sex="F" if k % 2 else "M")))
            sent += values_sent(bundle)
            result = bundle_to_events(bundle)
            kept += events_kept(result)
            a_sent += analytes_sent(bundle)
            a_kept += Counter(e.code for e in result.events if e.code in ANALYTES.values())
        for kind in sorted(sent):
            print(f"{profile:<16}{kind:<20}{sent[kind]:>6}{kept[kind]:>6}"
                  f"{kept[kind] / sent[kind]:>10.1%}")
        total_sent += sent
        total_kept += kept
    for kind in sorted(total_sent):
        print(f"{'all':<16}{kind:<20}{total_sent[kind]:>6}{total_kept[kind]:>6}"
              f"{total_kept[kind] / total_sent[kind]:>10.1%}")
    for code in sorted(a_sent):
        print(f"{'task analytes':<16}{code:<20}{a_sent[code]:>6}{a_kept[code]:>6}"
              f"{a_kept[code] / a_sent[code]:>10.1%}")


if __name__ == "__main__":
    main()
