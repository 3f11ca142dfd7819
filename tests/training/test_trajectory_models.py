"""Trajectory models: conformalised quantiles that cover as promised on rows like the
calibration rows, never cross, are logged, packaged and gated with the risk models."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest

from features.events import EventArrays
from features.targets import target_column
from tests.conftest import make_events
from training.package import PREDICT_CODE, trajectory_output
from training.trajectory import (
    conformal_shift,
    conformalised,
    coverage_ok,
    fit_trajectories,
)


@pytest.fixture(scope="module")
def parts_1500(tmp_path_factory, eskd_task):
    """Train, early-stopping, tuning and held-out parts of a 1,500-subject cohort."""
    from features.events import open_meds, write_meds
    from features.pipeline import build_training_frame
    from features.simulate import CODES, simulate_cohort
    from training.train import TrainOptions, _split_frame

    path = write_meds(simulate_cohort(1500, seed=11), tmp_path_factory.mktemp("c") / "m",
                      codes=CODES)
    frame, spec = build_training_frame(open_meds(path), eskd_task)
    return _split_frame(frame, eskd_task, TrainOptions()), spec


def test_held_out_coverage_within_the_band_its_rows_allow(parts_1500, eskd_task):
    parts, spec = parts_1500
    names = spec.feature_names
    models = fit_trajectories(eskd_task, parts, names, {}, seed=0)
    assert [(m.code, m.horizon_days) for m in models] == [("LAB//EGFR", 365),
                                                          ("LAB//EGFR", 730)]
    held = parts["held_out"]
    for m in models:
        y = held[target_column(m.code, m.horizon_days)].to_numpy(np.float64)
        keep = np.isfinite(y)
        pred = m.predict(held[names].to_numpy(np.float32)[keep])
        inside = (y[keep] >= pred[:, 0]) & (y[keep] <= pred[:, 2])
        n = np.unique(held["subject_id"].to_numpy()[keep]).size  # rows cluster in subjects
        tolerance = 3 * math.sqrt(0.8 * 0.2 / n)
        assert abs(inside.mean() - 0.8) <= tolerance, (m.horizon_days, inside.mean(), n)
        assert (np.diff(pred, axis=1) >= 0).all()
        # the raw quantiles are not the answer: the tuning rows moved them
        assert m.corrections["0.1-0.9"] != 0


def test_quantiles_never_cross_even_when_the_correction_shrinks_them():
    raw = np.array([[10.0, 12.0, 14.0], [10.0, 10.5, 11.0], [13.0, 12.0, 11.0]])
    out = conformalised(raw, [0.1, 0.5, 0.9], {"0.1-0.9": -2.0})
    assert (np.diff(out, axis=1) >= 0).all()
    np.testing.assert_array_equal(out[0], [12.0, 12.0, 12.0])  # shrunk onto the median
    np.testing.assert_array_equal(out[2], [12.0, 12.0, 12.0])  # raw ones crossed


def test_the_conformal_shift_is_the_finite_sample_quantile():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(4000):  # exchangeable rows: coverage ⌈(n+1)·0.8⌉/(n+1) on average
        y = rng.normal(size=60)
        shift = conformal_shift(np.full(50, -0.5), np.full(50, 0.5), y[:50], 0.8)
        hits.append(np.mean(np.abs(y[50:]) <= 0.5 + shift))
    # 41/51 = 0.804; the Monte Carlo standard error is about 0.002
    assert abs(np.mean(hits) - 41 / 51) < 0.008
    with pytest.raises(ValueError, match="cannot give 80% coverage"):
        conformal_shift(np.zeros(3), np.zeros(3), np.ones(3), 0.8)


def test_the_gate_refuses_coverage_off_its_limit_or_unjudged(eskd_task):
    def entry(cov, rows=500):
        return {"code": "LAB//EGFR", "horizon_days": 365, "rows": rows,
                "overall": {"coverage_80": {"estimate": cov, "lower": cov - .01,
                                            "upper": cov + .01}} if rows else {}}

    assert coverage_ok([entry(0.79)], eskd_task)[0]
    ok, why = coverage_ok([entry(0.70)], eskd_task)
    assert not ok and "80% interval covers 0.700" in why
    ok, why = coverage_ok([entry(0.80, rows=0)], eskd_task)  # e.g. a temporal hold-out
    assert not ok and "cannot be judged" in why


def test_nested_intervals_only_widen():
    """Two intervals shifted apart by their corrections: the inner one is never narrowed
    by the outer one's ends (it keeps at least its calibrated width)."""
    raw = np.array([[8.0, 9.0, 10.0, 11.0, 12.0]])
    out = conformalised(raw, [0.05, 0.1, 0.5, 0.9, 0.95], {"0.1-0.9": 3.0, "0.05-0.95": 0.0})
    np.testing.assert_array_equal(out[0], [6.0, 6.0, 10.0, 14.0, 14.0])


def test_tracked_packaged_and_gated_with_the_risk_models(trained, tracker):
    best = trained.candidates[trained.best]
    report = best.report["trajectories"]
    assert {e["horizon_days"] for e in report} == {365, 730}
    for e in report:
        assert e["rows"] > 0 and isinstance(e["raw_crossing_rows"], int)
        assert 0 <= e["raw_crossing_rows"] <= e["rows"]
        assert {"mae", "coverage_80", "width_80"} == set(e["overall"])
        assert len(e["by_risk_decile"]["deciles"]) == 10 and e["by_subgroup"]
    assert {e["family"] for e in best.report["trajectory_baseline"]} == {"linear"}
    run = tracker.client.get_run(best.run_id)
    assert "trajectory_LAB_EGFR_730d_coverage_80" in run.data.metrics
    assert "trajectory_baseline_LAB_EGFR_730d_mae" in run.data.metrics
    assert "trajectory coverage within limits" in trained.reason
    # the package carries them: its pyfunc gives the bundle's quantiles
    with tracker.active():
        model = mlflow.pyfunc.load_model(best.model_uri)
    held = trained.heldout_rows.iloc[:1]
    sid, at = int(held["subject_id"].iloc[0]), held["prediction_time"].iloc[0]
    before = at - pd.Timedelta(days=30)
    req = pd.DataFrame({"subject_id": [sid, sid], "time": [before, at],
                        "code": ["LAB//EGFR", PREDICT_CODE], "numeric_value": [30.0, np.nan],
                        "text_value": [None, None]})
    req["time"] = req["time"].astype("datetime64[us]")
    req["text_value"] = req["text_value"].astype(object)
    out = model.predict(req)
    bundle = best.bundle
    arrays = EventArrays.from_events(make_events([(sid, before, "LAB//EGFR", 30.0)]))
    x = bundle.features_for(arrays, np.array([sid]), np.array([pd.Timestamp(at).value // 1000]))
    for t, q in zip(bundle.trajectory_models, bundle.predict_trajectories(x), strict=True):
        for j, level in enumerate(t.quantiles):
            assert out[trajectory_output(t.code, t.horizon_days, level)].iloc[0] == q[0, j]


def test_trajectories_at_t_ignore_everything_after_t(trained, small_cohort):
    """Leakage: the forecast of where eGFR is heading, made at t, is the same whether or
    not the events after t (the very values it forecasts) are in the history."""
    bundle = trained.candidates[trained.best].bundle
    rows = trained.heldout_rows
    checked = 0
    for sid, at in zip(rows["subject_id"][:40], rows["prediction_time"][:40], strict=True):
        ev = small_cohort[small_cohort["subject_id"] == sid]
        t_us = np.array([pd.Timestamp(at).value // 1000])
        upto = ev[(ev["time"] <= at) | ev["time"].isna()]
        if len(upto) == len(ev):
            continue
        full = bundle.predict_trajectories(bundle.features_for(
            EventArrays.from_events(ev), np.array([sid]), t_us))
        past = bundle.predict_trajectories(bundle.features_for(
            EventArrays.from_events(upto), np.array([sid]), t_us))
        for a, b in zip(full, past, strict=True):
            np.testing.assert_array_equal(a, b)
        checked += 1
    assert checked >= 10
