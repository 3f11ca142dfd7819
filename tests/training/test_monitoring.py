"""Monitoring's computations: realised labels are the training labels, realised metrics
are the evaluation's, the confidence-based estimate, drift against its noise, alerts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.events import EventArrays
from features.labels import derive_labels, labels_at, policy_mask, prediction_times, subject_summary
from features.task import Monitoring, parse_task
from training import monitoring as MON
from training.evaluate import EvalFrame, evaluate

DAY = MON.US_PER_DAY


def test_realised_labels_are_the_training_labels(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    train = derive_labels(arrays, eskd_task)
    t_us = train["prediction_time"].to_numpy("datetime64[us]").view(np.int64)
    # in another order, as stored forecasts come
    order = np.random.default_rng(0).permutation(len(train))
    got = labels_at(arrays, eskd_task, train["subject_id"].to_numpy()[order], t_us[order])
    pd.testing.assert_frame_equal(got, train.iloc[order].reset_index(drop=True))
    assert train["event_type"].nunique() == 3  # outcomes, competing deaths and censoring


def test_a_subject_with_no_history_is_censored_at_its_time(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    got = labels_at(arrays, eskd_task, np.array([10**9]), np.array([1_600_000_000 * 10**6]))
    assert got["event_type"].tolist() == [0] and got["event_time_days"].tolist() == [0.0]
    assert got["label_365d"].isna().all()


def test_the_policy_keeps_the_rows_training_keeps(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    summary = subject_summary(arrays, eskd_task)
    kept = prediction_times(arrays, eskd_task, summary)
    # every eligible visit, thinned by the policy, gives training's prediction times
    no_gap = parse_task({**eskd_task.model_dump(mode="json"),
                         "prediction_times": {"min_gap_days": 0}})
    every = prediction_times(arrays, no_gap, subject_summary(arrays, no_gap))
    mask = policy_mask(every["subject_id"].to_numpy(), every["time_us"].to_numpy(), eskd_task)
    assert mask.sum() < len(every)
    assert np.array_equal(every["time_us"].to_numpy()[mask], kept["time_us"].to_numpy())


def test_realised_metrics_are_the_evaluation_codes(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    rows = derive_labels(arrays, eskd_task)
    rng = np.random.default_rng(1)
    risk = np.clip(rng.beta(1, 6, len(rows)) + 0.3 * rows["label_730d"].fillna(0).to_numpy(),
                   0, 1)
    hw = MON.horizon_window(risk, rows["subject_id"].to_numpy(), rows,
                            np.ones(len(rows), dtype=bool), 730, n_boot=20, seed=3)
    report = evaluate(risk[:, None], EvalFrame.from_training_rows(rows, [730]), [730],
                      n_boot=20, seed=3)
    for m in MON.REALISED_METRICS:
        assert hw.realised[m]["estimate"] == pytest.approx(
            report["horizons"]["730"]["rows"][m]["estimate"], rel=1e-12), m
        assert hw.realised_patients[m]["estimate"] == pytest.approx(
            report["horizons"]["730"]["patients"][m]["estimate"], rel=1e-12), m
    assert hw.matured_patients == rows["subject_id"].nunique()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_estimate_is_what_calibrated_risks_realise(seed):
    """Labels drawn from the risks themselves: the realised AUROC, AUPRC and Brier score
    scatter around the expected ones by sampling noise only.  Tolerance: 4 bootstrap
    standard errors of the realised value (a miss then has odds below 1 in 10,000)."""
    rng = np.random.default_rng(seed)
    n = 3000
    sid = np.repeat(np.arange(n // 3), 3)
    risk = rng.beta(0.6, 4.0, n)
    y = (rng.random(n) < risk).astype(float)
    labels = pd.DataFrame({"event_type": np.where(y == 1, 1, 2).astype(np.int8),
                           "event_time_days": np.full(n, 100.0), "label_365d": y})
    hw = MON.horizon_window(risk, sid, labels, np.ones(n, dtype=bool), 365, n_boot=200,
                            seed=seed)
    for m in ("auroc", "brier"):
        got, want = hw.realised[m], hw.expected[m]["estimate"]
        assert abs(got["estimate"] - want) < 4 * got["se"], (m, got, want)
    # the estimate assumes calibration: risks doubled (miscalibrated) realise less
    # than they promise, and the estimate cannot see it
    y2 = (rng.random(n) < risk / 2).astype(float)
    labels2 = labels.assign(label_365d=y2, event_type=np.where(y2 == 1, 1, 2).astype(np.int8))
    hw2 = MON.horizon_window(risk, sid, labels2, np.ones(n, dtype=bool), 365, n_boot=200,
                             seed=seed)
    assert hw2.expected["brier"]["estimate"] == pytest.approx(hw.expected["brier"]["estimate"])
    assert hw2.realised["citl"]["estimate"] < -0.4


def test_counted_forecasts():
    v = np.array(["1", "1", "1", "2", "1", "1"], dtype=object)
    sid = np.array([7, 7, 7, 7, 8, 9])
    as_of = np.array([0, 0, 5, 0, 0, 0]) * DAY
    created = np.array([1, 2, 6, 40, 45, 1]) * DAY
    after = np.array([99, 99, 99, 99, 99, 1]) * DAY  # twin 9: something later known by day 1
    keep = MON.counted(v, sid, as_of, created, after, max_delay_days=30)
    # first of the two (1, 7, 0); the later as-of counts; version 2 made 40 days late (a
    # refresh of an old as-of time) does not, nor twin 8's; twin 9's knew what came after
    assert keep.tolist() == [True, False, True, False, False, False]


def test_psi_of_noise_stays_below_its_noise_level():
    rng = np.random.default_rng(0)
    ref = MON._profile(rng.normal(50, 10, 5000), 5000)
    fired = 0
    for _ in range(200):
        d = MON.drift(rng.normal(50, 10, 400), ref)
        fired += d["psi"] > MON.psi_noise(d["n_reference"], d["n"], d["bins"], 0.99)
    assert fired <= 2 * 200 * 0.01 + 3  # about 1% beyond the 99% noise level
    shifted = MON.drift(rng.normal(50, 10, 400) * 1.3, ref)
    assert shifted["psi"] > MON.psi_noise(shifted["n_reference"], 400, shifted["bins"], 0.9999)
    assert shifted["chi2_p"] < 1e-6
    with_missing = rng.normal(50, 10, 400)
    with_missing[:200] = np.nan
    d = MON.drift(with_missing, ref)
    assert d["missing_now"] == 0.5 and d["missing_reference"] == 0.0 and d["psi"] > 1


def test_alerts_need_the_difference_beyond_the_margin_with_confidence():
    cfg = Monitoring()
    window = ("2020-01-01T00:00:00", "2020-04-01T00:00:00")

    def metric(value, se):
        return MON.Test("metric", "1", window, "citl", 365, value, 0.0,
                        {"se_realised": se, "se_reference": 0.0})
    sure = metric(0.6, 0.05)  # 0.6 ± 3·0.05: beyond the 0.2 margin
    unsure = metric(0.6, 0.2)  # could be within it
    small = metric(0.1, 0.001)  # certain, but within the margin
    got = MON.decide_alerts([sure, unsure, small], cfg)
    assert [a["value"] for a in got] == [0.6] and got[0]["evidence"]["margin"] == 0.2
    # more tests in the run, a stricter level: the same evidence may no longer suffice
    many = [metric(0.6, 0.115)] + [small] * 999
    assert MON.decide_alerts(many[:1], cfg) and not MON.decide_alerts(many, cfg)
    drift = MON.Test("drift", "1", window, "x", None, 0.15, 0.0,
                     {"n_reference": 100, "n": 100, "bins": 11})
    # PSI 0.15 is above the threshold but within what 100 against 100 patients give by
    # chance; with 10,000 against 10,000 it is not
    assert not MON.decide_alerts([drift], cfg)
    drift.evidence.update(n_reference=10_000, n=10_000)
    assert MON.decide_alerts([drift], cfg)


def test_the_monitoring_section_is_checked_and_outside_the_digest(eskd_task):
    data = eskd_task.model_dump(mode="json")
    tuned = parse_task({**data, "monitoring": {"psi_threshold": 0.3, "window_days": 30}})
    assert tuned.monitoring.psi_threshold == 0.3
    assert tuned.digest() == eskd_task.digest()  # thresholds are not the model
    with pytest.raises(ValueError, match="monitoring"):
        parse_task({**data, "monitoring": {"psi_treshold": 0.3}})
    with pytest.raises(ValueError, match="min_patients"):
        parse_task({**data, "monitoring": {"min_patients": 3}})


def test_the_reference_holds_no_small_cells_and_ranks_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    x[:50, 2] = np.nan
    x[:, 3] = (rng.random(300) < 0.02).astype(np.float32)  # a rare flag: ties, tiny bins
    x[:5, 3] = np.nan  # 5 missing: fewer than 10
    sid = np.repeat(np.arange(100), 3)
    ref = MON.reference_profile(x, sid, ["a", "b", "c", "d"], np.array([0.1, 0.9, 0.5, 0.2]),
                                rng.random((80, 1)), np.arange(80), [365], top=2)
    assert ref["top_features"] == ["b", "c"] and ref["n_patients"] == 100
    for prof in [*ref["features"].values(), *ref["risks"].values()]:
        counts = np.asarray(prof["shares"]) * prof["rows"]
        assert (counts[counts > 0] >= MON.MIN_CELL - 1e-6).all(), prof
        assert all(float(f"{e:.4g}") == e for e in prof["edges"])
    assert ref["features"]["d"]["missing"] * ref["features"]["d"]["rows"] >= 10 - 1e-6
