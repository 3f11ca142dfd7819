"""Trajectory targets: a numeric code's measured value near t+H, for quantile forecasts.

The estimand (``features.task.TrajectoryTarget``): at prediction time *t* and horizon
*H*, the measured value of the code nearest to t+H, at most ``tolerance_days`` away,
among patients alive and free of the outcome and the competing events then — by t+H and
at the measurement.  A patient who reaches the outcome or dies has no such value: the
trajectory is conditional on survival free of the outcome, and is always read beside
the risk of the outcome.  A patient with no measurement in the window has no value
either (the row does not train or evaluate that target); as the visits follow what was
measured, coverage is reported by risk decile and subgroup, not only overall.

The value is always after *t* (the tolerance is shorter than every horizon), so a
target never leaks into the features at *t*.
"""

from __future__ import annotations

import numpy as np

from features.events import NAT_US, EventArrays
from features.labels import NEVER, summary_arrays
from features.task import Task, TrajectoryTarget
from features.timeindex import US_PER_DAY

US_PER_S = 1_000_000


def target_column(code: str, horizon_days: int) -> str:
    """``target_LAB//EGFR_365d``: a training-set column (NaN where there is no value)."""
    return f"target_{code}_{horizon_days}d"


def target_columns(task: Task) -> list[str]:
    return [target_column(t.code, h) for t in getattr(task, "trajectories", [])
            for h in t.horizons_days]


def trajectory_targets(arrays: EventArrays, task: Task, subject_ids: np.ndarray,
                       times_us: np.ndarray) -> dict[str, np.ndarray]:
    """Per target column, the value for each (subject, t) row (float64, NaN: none)."""
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    times_us = np.asarray(times_us, dtype=np.int64)
    targets = getattr(task, "trajectories", [])
    if not targets:
        return {}
    s = summary_arrays(arrays, task)
    subj = s["subject_id"]
    row = np.searchsorted(subj, subject_ids)
    row_c = np.minimum(row, max(subj.size - 1, 0))
    known = (row < subj.size) & (subj[row_c] == subject_ids) if subj.size else \
        np.zeros(subject_ids.size, dtype=bool)
    stop = np.minimum(np.minimum(s["outcome_us"], s["competing_us"]), s["death_us"]) \
        if subj.size else np.empty(0, np.int64)
    stop_row = np.where(known, stop[row_c] if subj.size else NEVER, NEVER)
    out = {}
    for target in targets:
        for h in target.horizons_days:
            out[target_column(target.code, h)] = _nearest(
                arrays, target, subject_ids, times_us, h, stop_row)
    return out


def _nearest(arrays: EventArrays, target: TrajectoryTarget, sid: np.ndarray,
             t: np.ndarray, horizon_days: int, stop: np.ndarray) -> np.ndarray:
    want = t + horizon_days * US_PER_DAY
    tol = target.tolerance_days * US_PER_DAY
    m = arrays.code_mask(lambda c: c == target.code) & (arrays.time_us != NAT_US) \
        & np.isfinite(arrays.value)
    esid, et, ev = arrays.subject_id[m], arrays.time_us[m], arrays.value[m]
    out = np.full(sid.size, np.nan)
    if esid.size == 0 or sid.size == 0:
        return out
    # one sorted key over (subject, second): the subject's rank times the time span
    subjects = np.unique(np.concatenate([esid, sid]))
    lo = min(int(et.min()), int(want.min())) // US_PER_S
    span = max(int(et.max()), int(want.max())) // US_PER_S - lo + 2
    if subjects.size * span >= 2**62:
        raise ValueError("trajectory targets: times span too wide to index")
    e_key = np.searchsorted(subjects, esid) * span + (et // US_PER_S - lo)
    q_key = np.searchsorted(subjects, sid) * span + (want // US_PER_S - lo)
    order = np.argsort(e_key, kind="stable")  # events are subject-sorted; times may tie
    e_key, esid, et, ev = e_key[order], esid[order], et[order], ev[order]
    pos = np.searchsorted(e_key, q_key, side="left")
    best = np.full(sid.size, -1, dtype=np.int64)
    best_gap = np.full(sid.size, np.iinfo(np.int64).max, dtype=np.int64)
    for cand in (pos - 1, pos):  # the last value before t+H, the first at or after it
        c = np.clip(cand, 0, esid.size - 1)
        gap = np.abs(et[c] - want)
        ok = (cand >= 0) & (cand < esid.size) & (esid[c] == sid) & (gap <= tol) \
            & (et[c] > t) & (stop > np.maximum(et[c], want)) & (gap < best_gap)
        best = np.where(ok, c, best)
        best_gap = np.where(ok, gap, best_gap)
    hit = best >= 0
    out[hit] = ev[best[hit]]
    return out
