"""Trajectory features against slow, obviously written references: windowed first value,
changes, time-weighted mean and Theil–Sen slope; exponentially weighted level and trend;
the local-linear-trend Kalman filter (matrix form here, scalar form in the kernel) —
none of them ever reads a value after t; and the filter's noise estimated back from
data simulated with known noise."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from hypothesis import given
from hypothesis import strategies as st

from features.events import EventArrays, events_from_frame
from features.featurize import THEIL_SEN_POINTS, build_features
from features.spec import CodeFeature, FeatureSpec, kalman_noise, pair_bins
from features.task import TRAJECTORY_AGGREGATIONS, parse_task
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY
from tests.features.test_featurize import assert_no_future_event_counts, codes, streams

NOISE = [4.0, 9.0, 1.0, 25.0]
TASK = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [365],
                   "features": {"windows": ["7d", "30d", "all"],
                                "numeric_aggregations": ["last", *TRAJECTORY_AGGREGATIONS],
                                "trajectory": {"ewm_half_life_days": [30, 365],
                                               "kalman": True}}})
SPEC = FeatureSpec.from_codes(TASK, [
    CodeFeature(code="LAB//A", kind="numeric", kalman=NOISE),
    CodeFeature(code="LAB//B", kind="numeric"),  # no noise estimate: no Kalman features
    CodeFeature(code="RX//C", kind="categorical"),
])
YEAR = US_PER_DAY * DAYS_PER_YEAR


def _ewm(tt, vv, half_life_years, t):
    level, trend = vv[0], 0.0
    for j in range(1, len(vv)):
        d = (tt[j] - tt[j - 1]) / YEAR
        a = 1 - math.exp(-math.log(2) * d / half_life_years)
        new = a * vv[j] + (1 - a) * (level + trend * d)
        if d > 0:
            trend = a * (new - level) / d + (1 - a) * trend
        level = new
    return level + trend * (t - tt[-1]) / YEAR, trend


def _kalman(tt, vv, noise, t):
    r, ql, qs, p_s = noise
    x = np.array([vv[0], 0.0])
    p = np.diag([r, p_s])
    h = np.array([[1.0, 0.0]])
    for j in range(1, len(vv)):
        d = (tt[j] - tt[j - 1]) / YEAR
        f = np.array([[1.0, d], [0.0, 1.0]])
        q = np.array([[ql * d + qs * d ** 3 / 3, qs * d ** 2 / 2], [qs * d ** 2 / 2, qs * d]])
        x, p = f @ x, f @ p @ f.T + q
        k = p @ h.T / (h @ p @ h.T + r)
        x = x + (k * (vv[j] - h @ x)).ravel()
        p = (np.eye(2) - k @ h) @ p
    return x[0] + x[1] * (t - tt[-1]) / YEAR, x[1]


def reference(ev: pd.DataFrame, subject: int, t_us: int) -> dict[str, float]:
    out: dict[str, float] = {}
    mine = ev[(ev["subject_id"] == subject) & ~np.isnat(ev["time"].to_numpy())]
    tu = mine["time"].to_numpy().astype("datetime64[us]").view(np.int64)
    for cf in SPEC.codes:
        if cf.kind != "numeric":
            continue
        sel = ((mine["code"] == cf.code).to_numpy() & (tu <= t_us)
               & ~np.isnan(mine["numeric_value"].to_numpy(np.float64)))
        times, vals = tu[sel], mine["numeric_value"].to_numpy(np.float64)[sel]
        order = np.argsort(times, kind="stable")
        times, vals = times[order], vals[order]
        for w, days in zip(SPEC.windows, SPEC.window_days, strict=True):
            inw = times > t_us - days * US_PER_DAY if np.isfinite(days) else times == times
            wt, wv = times[inw], vals[inw]
            n = len(wv)
            name = lambda a, w=w, c=cf.code: SPEC.feature_name(c, w, a)  # noqa: E731
            if n:
                out[name("last")], out[name("first")] = wv[-1], wv[0]
                dur = np.diff(np.r_[wt, t_us]) / US_PER_DAY
                out[name("time_weighted_mean")] = (float(np.sum(dur * wv) / dur.sum())
                                                   if dur.sum() > 0 else float(wv.mean()))
            if n >= 2:
                out[name("change_since_first")] = wv[-1] - wv[0]
                out[name("change_since_previous")] = wv[-1] - wv[-2]
                lt, lv = wt[-THEIL_SEN_POINTS:], wv[-THEIL_SEN_POINTS:]
                slopes = [(lv[k] - lv[j]) / ((lt[k] - lt[j]) / YEAR)
                          for j in range(len(lv)) for k in range(j + 1, len(lv))
                          if lt[k] != lt[j]]
                if slopes:
                    out[name("theil_sen_slope")] = float(np.median(slopes))
        if len(vals):
            for hl in SPEC.ewm_half_life_days:
                lvl, tr = _ewm(times, vals, hl / DAYS_PER_YEAR, t_us)
                out[SPEC.feature_name(cf.code, f"ewm{hl}d", "level")] = lvl
                out[SPEC.feature_name(cf.code, f"ewm{hl}d", "trend")] = tr
            if cf.kalman is not None:
                lvl, sl = _kalman(times, vals, cf.kalman, t_us)
                out[SPEC.feature_name(cf.code, "kalman", "level")] = lvl
                out[SPEC.feature_name(cf.code, "kalman", "slope")] = sl
    return out


TRAJECTORY_NAMES = [n for n in SPEC.feature_names
                    if any(n.endswith("__" + a) for a in (*TRAJECTORY_AGGREGATIONS, "level",
                                                          "trend"))
                    or "__kalman__" in n]


def test_the_spec_names_every_trajectory_feature():
    assert "LAB//A__kalman__level" in SPEC.feature_names
    assert "LAB//B__kalman__level" not in SPEC.feature_names
    assert "LAB//B__ewm365d__trend" in SPEC.feature_names
    assert "LAB//A__30d__theil_sen_slope" in SPEC.feature_names
    assert len(TRAJECTORY_NAMES) == 2 * (3 * 5 + 2 * 2) + 2


@given(streams())
def test_trajectory_features_match_the_reference(data):
    frame, queries = data
    ev = events_from_frame(frame, source="hypothesis")
    got = build_features(EventArrays.from_events(ev), np.array([q[0] for q in queries]),
                         np.array([q[1] for q in queries]), SPEC)
    for i, (s, t) in enumerate(queries):
        ref = reference(ev, s, t)
        for name in TRAJECTORY_NAMES:
            j = SPEC.feature_names.index(name)
            expected, actual = ref.get(name, math.nan), float(got[i, j])
            if math.isnan(expected):
                assert math.isnan(actual), f"{name} at query {i}: expected missing, {actual}"
            else:
                assert abs(actual - expected) <= 2e-6 * max(1.0, abs(expected)), (
                    f"{name} at query {i}: expected {expected}, got {actual}")


@given(streams(), st.lists(st.tuples(st.integers(1, 200), codes,
                                     st.floats(-500, 500, allow_nan=False)), min_size=1,
                           max_size=8))
def test_no_trajectory_feature_reads_a_value_after_t(data, future):
    frame, queries = data
    assert_no_future_event_counts(frame, queries, future, SPEC)


def test_the_kalman_noise_is_estimated_back_from_known_noise():
    """Pairs from patients with known measurement noise (R), level random walk (Q) and
    slope spread (S): the estimator finds R and S closely; Q, which the pairs separate
    from S only through the shape of the curve, to within 40%."""
    rng = np.random.default_rng(2)
    r, q, spread = 16.0, 4.0, 9.0
    bins = []
    for _ in range(10_000):
        slope = rng.normal(0, math.sqrt(spread))
        t = np.cumsum(rng.exponential(0.4, 12))
        level = np.cumsum(np.r_[0.0, rng.normal(0, np.sqrt(q * np.diff(t)))]) + slope * t
        y = 50 + level + rng.normal(0, math.sqrt(r), t.size)
        d, dy2 = np.diff(t), np.diff(y) ** 2
        bins.append(pair_bins(d, dy2))
    got = kalman_noise(np.sum(bins, axis=0))
    assert abs(got[0] - r) < 0.05 * r and abs(got[3] - spread) < 0.15 * spread
    assert abs(got[1] - q) < 0.4 * q and got[2] == got[3] / 10
    assert kalman_noise(pair_bins(np.ones(5), np.ones(5))) is None  # too few pairs


def test_the_embedded_cohort_freezes_plausible_noise_and_features_have_parity(small_cohort):
    """With the trajectory task the spec carries each numeric code's Kalman noise, fitted
    on training subjects (eGFR's measurement SD of a few ml/min, as simulated); one
    subject's features alone equal its rows in the batch (the service's path)."""
    from features.labels import derive_labels
    from features.spec import fit_feature_spec
    from features.splits import assign_splits
    from features.task import load_task
    from tests.conftest import ROOT

    task = load_task(ROOT / "examples" / "tasks" / "eskd_trajectory.yaml")
    arrays = EventArrays.from_events(small_cohort)
    spec = fit_feature_spec(
        [(arrays, assign_splits(arrays.subject_id, task.split) == "train")], task)
    egfr = next(c for c in spec.codes if c.code == "LAB//EGFR")
    assert egfr.kalman is not None and 1.0 < math.sqrt(egfr.kalman[0]) < 8.0
    assert all(c.kalman is None for c in spec.codes if c.kind != "numeric")
    rows = derive_labels(arrays, task)
    t = rows["prediction_time"].to_numpy().view(np.int64)
    batch = build_features(arrays, rows["subject_id"].to_numpy(), t, spec)
    j = spec.feature_names.index("LAB//EGFR__kalman__slope")
    assert np.isfinite(batch[:, j]).mean() > 0.9
    one = int(rows["subject_id"].iloc[len(rows) // 2])
    mine = (rows["subject_id"] == one).to_numpy()
    sub = small_cohort[small_cohort["subject_id"] == one]
    alone = build_features(EventArrays.from_events(sub), np.full(mine.sum(), one), t[mine],
                           spec)
    np.testing.assert_array_equal(alone, batch[mine])


def test_specs_and_tasks_from_before_trajectories_keep_their_digests():
    """A model pickled before these fields existed unpickles without them: its spec and
    task still digest, to what they digested to then (the service checks both)."""
    import pickle

    from features.spec import FeatureSpec

    task = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [365]})
    spec = FeatureSpec.from_codes(task, [CodeFeature(code="LAB//A", kind="numeric")])
    before = spec.digest(), task.digest()
    old_spec, old_task = pickle.loads(pickle.dumps(spec)), pickle.loads(pickle.dumps(task))
    del old_spec.__dict__["ewm_half_life_days"]
    for c in old_spec.codes:
        del c.__dict__["kalman"]
    del old_task.__dict__["references"]
    del old_task.features.__dict__["trajectory"]
    assert (old_spec.digest(), old_task.digest()) == before
    assert "ewm_half_life_days" not in spec.canonical_json()
    assert "trajectory" not in task.canonical_json()
