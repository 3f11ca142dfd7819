"""Point-in-time features against a slow, obviously correct reference."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.events import NAT_US, EventArrays, events_from_frame
from features.featurize import build_features
from features.labels import derive_labels
from features.spec import CodeFeature, FeatureSpec, fit_feature_spec
from features.splits import assign_splits
from features.task import parse_task
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY

TASK = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [365],
                   "features": {"windows": ["7d", "30d", "all"]}})
SPEC = FeatureSpec.from_codes(TASK, [
    CodeFeature(code="LAB//A", kind="numeric"),
    CodeFeature(code="LAB//B", kind="numeric"),
    CodeFeature(code="RX//C", kind="categorical"),
    CodeFeature(code="GENDER//F", kind="static"),
    CodeFeature(code="STATIC//H", kind="static", numeric=True),
])
BASE = np.datetime64("2020-01-01T00:00:00", "us").view(np.int64)


# --------------------------------------------------------------------------- the oracle


def reference_row(ev: pd.DataFrame, subject: int, t_us: int) -> dict[str, float]:
    """Features of one (subject, t) computed the slow, obvious way."""
    out: dict[str, float] = {}
    mine = ev[ev["subject_id"] == subject]
    tu = mine["time"].to_numpy().astype("datetime64[us]").view(np.int64)
    static = mine[np.isnat(mine["time"].to_numpy())]
    timed = mine[~np.isnat(mine["time"].to_numpy()) & (tu <= t_us)]
    ttu = timed["time"].to_numpy().astype("datetime64[us]").view(np.int64)
    births = timed[timed["code"] == "MEDS_BIRTH"]
    births_all = mine[mine["code"] == "MEDS_BIRTH"]
    if len(births_all):
        b = births_all["time"].to_numpy().astype("datetime64[us]").view(np.int64)[0]
        out["age_years"] = (t_us - b) / US_PER_DAY / DAYS_PER_YEAR
    del births
    for cf in SPEC.codes:
        if cf.kind == "static":
            s = static[static["code"] == cf.code]
            name = SPEC.static_name(cf.code)
            out[name] = (float(s["numeric_value"].iloc[0]) if len(s) else math.nan) \
                if cf.numeric else float(len(s) > 0)
            continue
        sel = (timed["code"] == cf.code).to_numpy().copy()
        if cf.kind == "numeric":
            sel &= ~np.isnan(timed["numeric_value"].to_numpy())
        times = ttu[sel]
        vals = timed["numeric_value"].to_numpy(np.float64)[sel]
        if cf.kind == "categorical":
            out[SPEC.feature_name(cf.code, None, "ever")] = float(len(times) > 0)
            out[SPEC.feature_name(cf.code, None, "days_since_first")] = (
                (t_us - times.min()) / US_PER_DAY if len(times) else math.nan)
        for w, days in zip(SPEC.windows, SPEC.window_days, strict=True):
            inw = times > t_us - days * US_PER_DAY if np.isfinite(days) else np.ones_like(
                times, bool)
            wt, wv = times[inw], vals[inw]
            name = lambda agg, w=w, c=cf.code: SPEC.feature_name(c, w, agg)  # noqa: E731
            out[name("count")] = float(len(wt))
            if cf.kind == "categorical":
                continue
            n = len(wv)
            out[name("last")] = wv[-1] if n else math.nan
            out[name("mean")] = float(np.mean(wv)) if n else math.nan
            out[name("min")] = float(np.min(wv)) if n else math.nan
            out[name("max")] = float(np.max(wv)) if n else math.nan
            out[name("std")] = float(np.std(wv, ddof=1)) if n >= 2 else math.nan
            out[name("days_since_last")] = (t_us - wt[-1]) / US_PER_DAY if n else math.nan
            x = (wt - wt.min()) / US_PER_DAY / DAYS_PER_YEAR if n else wt
            if n and len(np.unique(wt)) >= 2:
                out[name("slope")] = float(np.polyfit(x, wv, 1)[0])
            else:
                out[name("slope")] = math.nan
    return out


# --------------------------------------------------------------------------- strategies

codes = st.sampled_from(["LAB//A", "LAB//B", "RX//C", "OTHER//D"])
event = st.tuples(
    st.integers(1, 3),                        # subject
    st.integers(0, 120),                      # day (small grid: ties and shared times)
    st.sampled_from([0, 6, 12]),              # hour
    codes,
    st.one_of(st.none(), st.floats(-500, 500, allow_nan=False).map(lambda v: round(v, 2))),
)


@st.composite
def streams(draw):
    rows = draw(st.lists(event, min_size=0, max_size=40))
    statics = draw(st.lists(st.tuples(st.integers(1, 3), st.sampled_from(
        ["GENDER//F", "STATIC//H"]), st.floats(100, 200, allow_nan=False)), max_size=4))
    births = draw(st.lists(st.integers(1, 3), max_size=3, unique=True))
    queries = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(-5, 130),
                                      st.sampled_from([0, 6, 12, 18])), min_size=1,
                            max_size=12))
    frame = pd.DataFrame(
        [(s, BASE + (d * 24 + h) * 3_600_000_000, c, v) for s, d, h, c, v in rows]
        + [(s, NAT_US, c, v) for s, c, v in statics]
        + [(s, BASE - 50 * 365 * US_PER_DAY, "MEDS_BIRTH", None) for s in births],
        columns=["subject_id", "time_us", "code", "numeric_value"],
    )
    frame["time"] = frame.pop("time_us").astype(np.int64).to_numpy().view("datetime64[us]")
    frame["numeric_value"] = frame["numeric_value"].astype(np.float64)
    q = [(s, BASE + (d * 24 + h) * 3_600_000_000) for s, d, h in queries]
    return frame, q


def assert_matches_reference(ev: pd.DataFrame, queries) -> None:
    arrays = EventArrays.from_events(ev)
    sid = np.array([q[0] for q in queries], dtype=np.int64)
    tq = np.array([q[1] for q in queries], dtype=np.int64)
    got = build_features(arrays, sid, tq, SPEC)
    assert got.dtype == np.float32 and got.shape == (len(queries), len(SPEC.feature_names))
    for i, (s, t) in enumerate(queries):
        ref = reference_row(ev, s, t)
        for j, name in enumerate(SPEC.feature_names):
            expected = ref.get(name, math.nan)
            actual = float(got[i, j])
            if math.isnan(expected):
                assert math.isnan(actual), f"{name} at query {i}: expected missing, got {actual}"
                continue
            # float32 output (relative rounding 6e-8); std and slope are two-pass sums of
            # deviations from the window's means, as accurate as the float64 reference
            assert abs(actual - expected) <= 1e-6 * max(1.0, abs(expected)), (
                f"{name} at query {i}: expected {expected}, got {actual}")


@given(streams())
def test_every_window_aggregation_matches_the_reference(data):
    frame, queries = data
    ev = events_from_frame(frame, source="hypothesis")
    assert_matches_reference(ev, queries)


def test_reference_on_a_worked_example():
    rows = [(1, 0, "LAB//A", 10.0), (1, 10, "LAB//A", 20.0), (1, 20, "LAB//A", 30.0),
            (1, 20, "RX//C", None)]
    frame = pd.DataFrame({
        "subject_id": [r[0] for r in rows],
        "time": [np.datetime64("2020-01-01", "us") + np.timedelta64(r[1], "D") for r in rows],
        "code": [r[2] for r in rows], "numeric_value": [r[3] for r in rows]})
    ev = events_from_frame(frame)
    t = np.datetime64("2020-01-21", "us").view(np.int64)
    x = dict(zip(SPEC.feature_names, build_features(EventArrays.from_events(ev),
                                                    np.array([1]), np.array([t]), SPEC)[0],
                 strict=True))
    assert x["LAB//A__all__mean"] == pytest.approx(20.0)
    assert x["LAB//A__all__std"] == pytest.approx(10.0)
    assert x["LAB//A__all__slope"] == pytest.approx(365.25, rel=1e-5)  # +1 per day
    assert x["LAB//A__7d__count"] == 1 and x["LAB//A__7d__last"] == 30.0
    assert np.isnan(x["LAB//A__7d__std"]) and np.isnan(x["LAB//A__7d__slope"])
    assert x["LAB//B__all__count"] == 0 and np.isnan(x["LAB//B__all__mean"])
    assert x["RX//C__ever"] == 1 and x["RX//C__days_since_first"] == 0
    assert x["GENDER//F__static"] == 0 and np.isnan(x["STATIC//H__static"])


# --------------------------------------------------------------------------- leakage


def assert_no_future_event_counts(frame: pd.DataFrame, queries, future, spec) -> None:
    """Events after each query's t (``future``: (hours after t, code, value)) added to its
    subject change none of its features at t."""
    before = build_features(EventArrays.from_events(events_from_frame(frame)),
                            np.array([q[0] for q in queries]),
                            np.array([q[1] for q in queries]), spec)
    for i, (s, t) in enumerate(queries):
        extra = pd.DataFrame({
            "subject_id": s, "time": (np.array([t + f[0] * 3_600_000 for f in future])
                                      .astype(np.int64).view("datetime64[us]")),
            "code": [f[1] for f in future], "numeric_value": [f[2] for f in future]})
        grown = events_from_frame(pd.concat([frame, extra], ignore_index=True))
        after = build_features(EventArrays.from_events(grown), np.array([s]), np.array([t]),
                               spec)
        np.testing.assert_array_equal(after[0], before[i])


@given(streams(), st.lists(st.tuples(st.integers(1, 200), codes,
                                     st.floats(-500, 500, allow_nan=False)), min_size=1,
                           max_size=10))
def test_an_event_after_t_changes_no_feature_at_t(data, future):
    frame, queries = data
    assert_no_future_event_counts(frame, queries, future, SPEC)


# --------------------------------------------------------------------------- parity


def test_one_subject_alone_equals_its_rows_in_the_batch(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    spec = fit_feature_spec(
        [(arrays, assign_splits(arrays.subject_id, eskd_task.split) == "train")], eskd_task)
    labels = derive_labels(arrays, eskd_task)
    t = labels["prediction_time"].to_numpy().view(np.int64)
    batch = build_features(arrays, labels["subject_id"].to_numpy(), t, spec)
    rng = np.random.default_rng(0)
    subjects = rng.choice(labels["subject_id"].unique(), size=60, replace=False)
    for s in subjects:
        one = small_cohort[small_cohort["subject_id"] == s]
        rows = np.flatnonzero(labels["subject_id"].to_numpy() == s)
        alone = build_features(EventArrays.from_events(one), np.full(rows.size, s), t[rows], spec)
        np.testing.assert_array_equal(alone, batch[rows], err_msg=f"subject {s}")


def test_spec_is_frozen_from_training_subjects_only(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    train = assign_splits(arrays.subject_id, eskd_task.split) == "train"
    spec = fit_feature_spec([(arrays, train)], eskd_task)
    kinds = {c.code: c.kind for c in spec.codes}
    assert kinds["LAB//EGFR"] == "numeric" and kinds["RX//ACEI"] == "categorical"
    assert kinds["GENDER//F"] == "static"
    # outcome, competing, birth and administrative codes never become features
    assert not {"DX//ESKD", "MEDS_DEATH", "MEDS_BIRTH", "ADMIN//END_OF_FOLLOWUP"} & set(kinds)
    # a code only held-out subjects have is not in the vocabulary
    held = arrays.subject_id[~train][0]
    extra = pd.DataFrame({"subject_id": [held], "time": [np.datetime64("2016-01-01", "us")],
                          "code": ["LAB//RARE"], "numeric_value": [1.0]})
    grown = events_from_frame(pd.concat([small_cohort.assign(code=small_cohort["code"]
                                                              .astype(str)), extra]))
    g = EventArrays.from_events(grown)
    tight = eskd_task.model_copy(update={"features": eskd_task.features.model_copy(
        update={"min_code_subjects": 1})})
    spec2 = fit_feature_spec([(g, assign_splits(g.subject_id, eskd_task.split) == "train")],
                             tight)
    assert "LAB//RARE" not in {c.code for c in spec2.codes}


def _cohort_queries(small_cohort, eskd_task):
    arrays = EventArrays.from_events(small_cohort)
    spec = fit_feature_spec(
        [(arrays, assign_splits(arrays.subject_id, eskd_task.split) == "train")], eskd_task)
    labels = derive_labels(arrays, eskd_task)
    return arrays, spec, labels["subject_id"].to_numpy(), \
        labels["prediction_time"].to_numpy().view(np.int64)


def test_events_in_any_order_give_the_same_features(small_cohort, eskd_task):
    """Arrays straight from an unsorted frame (not canonical) are sorted per code."""
    arrays, spec, sid, t = _cohort_queries(small_cohort, eskd_task)
    shuffled = small_cohort.sample(frac=1.0, random_state=3)
    # the cohort has one value per (subject, code, time), so order decides nothing else
    assert not shuffled.duplicated(["subject_id", "code", "time"]).any()
    np.testing.assert_array_equal(
        build_features(EventArrays.from_events(shuffled), sid, t, spec),
        build_features(arrays, sid, t, spec))


def test_threads_give_the_same_features_as_one(small_cohort, eskd_task, monkeypatch):
    from features import featurize

    arrays, spec, sid, t = _cohort_queries(small_cohort, eskd_task)
    one = build_features(arrays, sid, t, spec, threads=1)
    monkeypatch.setattr(featurize, "PARALLEL_MIN_ROWS", 0)
    np.testing.assert_array_equal(build_features(arrays, sid, t, spec, threads=2), one)
    # and the query order does not matter
    order = np.random.default_rng(1).permutation(sid.size)
    np.testing.assert_array_equal(build_features(arrays, sid[order], t[order], spec, threads=2),
                                  one[order])


def test_a_features_process_starts_without_a_jit():
    """The kernels are compiled at install: building a training set imports no JIT
    (numba's import and cache loading cost ~0.4 s of every ``twincast features``)."""
    import subprocess
    import sys

    code = ("import sys, twincast.cli, features.pipeline, features.featurize as f; "
            "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules)); "
            "print(f._kernels.__file__.endswith('.so'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["[]", "True"]


def test_the_kernels_refuse_inputs_they_would_index_out_of_bounds():
    from features import _kernels

    offsets, t, v = np.array([0, 2]), np.array([1, 2]), np.array([1.0, 2.0])
    lengths, cols = np.array([-1]), np.full((1, _kernels.N_NUMERIC_AGGS), -1)
    out = np.zeros((3, 1), dtype=np.float32)
    _kernels.numeric(offsets, t, v, np.array([0]), np.array([5]), lengths, cols, out)
    for sidx, q_t, offs, o in [
        (np.array([1]), np.array([5]), offsets, out),  # a subject past the offsets
        (np.array([0]), np.array([5]), np.array([0, 3]), out),  # offsets past the events
        (np.array([0, 0]), np.array([5, 6]), offsets, out),  # fewer columns than queries
    ]:
        with pytest.raises(ValueError):
            _kernels.numeric(offs, t, v, sidx, q_t, lengths, cols, o)
    with pytest.raises(ValueError):  # a window without its row of columns
        _kernels.numeric(offsets, t, v, np.array([0]), np.array([5]), np.array([-1, 10]),
                         cols, out)
