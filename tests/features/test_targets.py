"""Trajectory targets: the measured value nearest t+H within the tolerance, among patients
alive and free of the outcome then — against hand-made patients and a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from features.events import EventArrays
from features.targets import target_column, target_columns, trajectory_targets
from features.task import parse_task
from tests.conftest import make_events

T0 = pd.Timestamp("2020-01-01")


def task(tolerance: int = 90):
    return parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]},
                       "horizons_days": [365],
                       "trajectories": [{"code": "LAB//EGFR", "horizons_days": [365, 730],
                                         "tolerance_days": tolerance}]})


def day(d: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(days=d)


def targets_of(rows, sids, days, t=None):
    arrays = EventArrays.from_events(make_events(rows))
    times = np.array([day(d).value // 1000 for d in days], dtype=np.int64)
    return trajectory_targets(arrays, t or task(), np.asarray(sids, dtype=np.int64), times)


def test_the_nearest_value_within_the_window():
    rows = [(1, day(0), "LAB//EGFR", 40.0), (1, day(300), "LAB//EGFR", 35.0),
            (1, day(370), "LAB//EGFR", 33.0), (1, day(500), "LAB//EGFR", 30.0),
            (1, day(760), "LAB//EGFR", 25.0)]
    got = targets_of(rows, [1, 1], [0, 200])
    one, two = got[target_column("LAB//EGFR", 365)], got[target_column("LAB//EGFR", 730)]
    assert one[0] == 33.0  # 370 is 5 days from 365; 300 is 65
    assert two[0] == 25.0  # 760 is 30 days from 730
    assert one[1] == 30.0 and np.isnan(two[1])  # t=200: 565 → 500; 930 has nothing near


def test_a_tie_takes_the_earlier_value_and_outside_the_tolerance_is_none():
    rows = [(1, day(0), "LAB//EGFR", 40.0), (1, day(355), "LAB//EGFR", 36.0),
            (1, day(375), "LAB//EGFR", 34.0), (2, day(0), "LAB//EGFR", 40.0),
            (2, day(200), "LAB//EGFR", 30.0)]
    got = targets_of(rows, [1, 2], [0, 0])[target_column("LAB//EGFR", 365)]
    assert got[0] == 36.0 and np.isnan(got[1])


def test_no_value_after_the_outcome_or_death():
    rows = [
        # outcome before t+H: no value, even one measured before the outcome in the window
        (1, day(0), "LAB//EGFR", 20.0), (1, day(300), "LAB//EGFR", 9.0),
        (1, day(340), "DX//ESKD", None), (1, day(365), "LAB//EGFR", 8.0),
        # death after t+H and after the value: the value stands
        (2, day(0), "LAB//EGFR", 30.0), (2, day(360), "LAB//EGFR", 28.0),
        (2, day(400), "MEDS_DEATH", None),
        # death after t+H but before the nearest value: the earlier one (alive) is taken
        (3, day(0), "LAB//EGFR", 30.0), (3, day(340), "LAB//EGFR", 27.0),
        (3, day(366), "MEDS_DEATH", None), (3, day(368), "LAB//EGFR", 26.0),
    ]
    got = targets_of(rows, [1, 2, 3], [0, 0, 0])[target_column("LAB//EGFR", 365)]
    assert np.isnan(got[0]) and got[1] == 28.0 and got[2] == 27.0


def test_a_value_at_or_before_t_is_never_a_target():
    rows = [(1, day(0), "LAB//EGFR", 40.0), (1, day(30), "LAB//EGFR", 38.0)]
    t = task(tolerance=364)  # a window reaching back to the day after t
    got = targets_of(rows, [1], [0], t)[target_column("LAB//EGFR", 365)]
    assert got[0] == 38.0  # day 30 is after t = day 0
    got = targets_of(rows, [1], [30], t)[target_column("LAB//EGFR", 365)]
    assert np.isnan(got[0])  # t = day 30: both values are at or before it


def test_a_task_without_trajectories_has_no_targets():
    plain = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [365]})
    assert target_columns(plain) == []
    assert trajectory_targets(EventArrays.from_events(make_events(
        [(1, day(0), "LAB//EGFR", 1.0)])), plain, np.array([1]), np.array([0])) == {}


def oracle(rows, sid, t_day, h, tol):
    """Brute force: every value of the subject, the nearest valid one (earlier on a tie)."""
    stop = min([d for s, d, c, _ in rows if s == sid and c in ("DX//ESKD", "MEDS_DEATH")],
               default=np.inf)
    best = None
    for s, d, c, v in sorted(rows, key=lambda r: (r[0], r[1])):
        if s != sid or c != "LAB//EGFR" or d <= t_day:
            continue
        gap = abs(d - (t_day + h))
        if gap <= tol and stop > max(d, t_day + h) and (best is None or gap < best[0]):
            best = (gap, v)
    return np.nan if best is None else best[1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 1200),
                          st.sampled_from(["LAB//EGFR", "LAB//EGFR", "DX//ESKD", "MEDS_DEATH"]),
                          st.integers(5, 90)), min_size=1, max_size=30),
       st.lists(st.tuples(st.integers(1, 4), st.integers(0, 600)), min_size=1, max_size=8))
def test_equals_the_brute_force_oracle(raw, asks):
    rows = [(s, d, c, float(v) if c == "LAB//EGFR" else None) for s, d, c, v in raw]
    events = [(s, day(d), c, v) for s, d, c, v in rows]
    got = targets_of(events, [a for a, _ in asks], [b for _, b in asks])
    for h in (365, 730):
        want = [oracle(rows, s, d, h, 90) for s, d in asks]
        np.testing.assert_array_equal(got[target_column("LAB//EGFR", h)], want)


def test_the_training_set_carries_the_targets(small_cohort_dir, eskd_task):
    from features.events import open_meds
    from features.pipeline import build_training_frame

    frame, spec = build_training_frame(open_meds(small_cohort_dir), eskd_task)
    cols = target_columns(eskd_task)
    assert cols == ["target_LAB//EGFR_365d", "target_LAB//EGFR_730d"]
    assert set(cols) <= set(frame.columns) and not set(cols) & set(spec.feature_names)
    have = frame[cols[0]].notna()
    assert 0.3 < have.mean() < 0.95  # deaths, outcomes, gaps and the end leave some out
    # a row reaching the outcome within the horizon has no 365-day value
    hit = frame["label_365d"] == 1
    assert hit.any() and frame.loc[hit, cols[0]].isna().all()
