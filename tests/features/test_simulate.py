"""The synthetic CKD cohort: deterministic, plausible, and shaped as documented."""

from __future__ import annotations

import hashlib

import numpy as np

from features.events import EventArrays, write_meds
from features.labels import derive_labels
from features.simulate import CODES, simulate_cohort


def digest_dir(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*.parquet")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = write_meds(simulate_cohort(300, seed=3), tmp_path / "a", codes=CODES)
    b = write_meds(simulate_cohort(300, seed=3), tmp_path / "b", codes=CODES)
    c = write_meds(simulate_cohort(300, seed=4), tmp_path / "c", codes=CODES)
    assert digest_dir(a) == digest_dir(b) != digest_dir(c)


def test_cohort_is_plausible(small_cohort, eskd_task):
    ev = small_cohort
    egfr = ev.loc[ev["code"] == "LAB//EGFR", "numeric_value"]
    assert 25 < egfr.median() < 60
    per_subject = ev.groupby("subject_id")["code"]
    assert (per_subject.apply(lambda c: (c == "MEDS_BIRTH").sum()) == 1).all()
    outcome = set(ev.loc[ev["code"] == "DX//ESKD", "subject_id"])
    death = set(ev.loc[ev["code"] == "MEDS_DEATH", "subject_id"])
    assert outcome and death and not outcome & death  # follow-up stops at the first
    labels = derive_labels(EventArrays.from_events(ev), eskd_task)
    assert (labels["censored_730d"]).any() and (labels["label_730d"] == 1).any()


def test_sicker_patients_are_seen_more_often(small_cohort):
    ev = small_cohort
    visits = ev[~ev["time"].isna()].groupby("subject_id")["time"].nunique()
    span = ev.groupby("subject_id")["time"].agg(lambda t: (t.max() - t.min()).days / 365.25)
    low = ev[ev["code"] == "LAB//EGFR"].groupby("subject_id")["numeric_value"].min() < 30
    rate = (visits / span.clip(lower=0.5)).reindex(low.index)
    assert rate[low].median() > 1.3 * rate[~low].median()


def test_sglt2_inhibitor_slows_decline_among_diabetics():
    ev = simulate_cohort(3000, seed=11)
    egfr = ev[ev["code"] == "LAB//EGFR"]
    first_last = egfr.groupby("subject_id").agg(
        t0=("time", "min"), t1=("time", "max"), v0=("numeric_value", "first"),
        v1=("numeric_value", "last"))
    years = (first_last["t1"] - first_last["t0"]).dt.days / 365.25
    slope = ((first_last["v1"] - first_last["v0"]) / years)[years > 2]
    diabetic = slope.index.isin(ev.loc[ev["code"] == "DX//DIABETES", "subject_id"].unique())
    treated = slope.index.isin(ev.loc[ev["code"] == "RX//SGLT2", "subject_id"].unique())
    assert (diabetic & treated).sum() > 100 and (diabetic & ~treated).sum() > 100
    assert np.median(slope[diabetic & treated]) > np.median(slope[diabetic & ~treated]) + 0.3
