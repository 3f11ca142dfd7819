"""Point-in-time features: one function for a training set of millions of rows and for
one patient in the service, so offline and online features are identical by construction.

Features at *t* use only events with ``time <= t`` (static facts always).  A window *w*
covers (*t* − *w*, *t*]; ``all`` covers all history.  Per numeric code and window: last,
mean, min, max, std (ddof 1), count, slope (OLS, per year; missing with fewer than two
distinct times) and days since last; per categorical code: ever, count per window and
days since first; plus age at *t* and static facts.  Missing stays NaN, never zero.

A patient's own trajectory, where the task asks for it: per numeric code and window,
the first value, the change since the first and since the previous value, the
time-weighted mean (each value holding until the next, the last until *t*) and a
Theil–Sen slope (the median of pairwise slopes over the window's last 20 values, robust
to the odd wrong measurement); per numeric code over all history, an exponentially
weighted level and trend per half-life and a local-linear-trend Kalman filter's level
and slope — filtered, never smoothed: only values at or before *t* enter — with its
noise variances estimated on the training split (``features.spec.kalman_noise``).

How it is fast and exact: each code's events are sorted by (subject, time) once, with
one offset per subject.  A compiled kernel (``features/_kernels.pyx``, Cython, built at
install so that a process starts with it ready) then answers every query in a single
pass: two binary searches in the subject's own events give the window's row range, and
one sweep over exactly those rows gives every aggregation (two passes for std and slope,
centred on the window's own means).  A query's numbers therefore depend only on its own
subject's events at or before *t* — never on who else is in the batch — and the kernel
releases the GIL, so codes run on all cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from features import _kernels
from features.events import BIRTH_CODE, NAT_US, EventArrays, subject_bounds
from features.spec import FeatureSpec
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY

PARALLEL_MIN_ROWS = 20_000  # below this, threads cost more than they save
ALL_HISTORY = -1  # window length (µs) meaning "all history"
# numeric aggregations in the kernel's column order
NUMERIC_AGGS = ("last", "mean", "min", "max", "std", "count", "slope", "days_since_last",
                "first", "change_since_first", "change_since_previous", "time_weighted_mean",
                "theil_sen_slope")
THEIL_SEN_POINTS = _kernels.THEIL_POINTS  # a window's Theil–Sen slope: its last 20 values
if len(NUMERIC_AGGS) != _kernels.N_NUMERIC_AGGS:  # the kernel's columns are these
    raise ImportError("features/_kernels.pyx is out of step with NUMERIC_AGGS: reinstall")


# --------------------------------------------------------------------------- the builder


class _CodeEvents:
    """One code's timed events, sorted by (subject, time), with per-subject offsets."""

    def __init__(self, sidx: np.ndarray, t: np.ndarray, v: np.ndarray, n_subjects: int):
        if sidx.size > 1:
            same = sidx[1:] == sidx[:-1]
            if (sidx[1:] < sidx[:-1]).any() or (same & (t[1:] < t[:-1])).any():
                order = np.lexsort((t, sidx))  # stable: ties keep their canonical order
                sidx, t, v = sidx[order], t[order], v[order]
        self.t = np.ascontiguousarray(t, dtype=np.int64)
        self.v = np.ascontiguousarray(v, dtype=np.float64)
        self.offsets = np.zeros(n_subjects + 1, dtype=np.int64)
        np.cumsum(np.bincount(sidx, minlength=n_subjects), out=self.offsets[1:])


@dataclass(frozen=True)
class _CodePlan:
    """One code's kernel arguments, from the spec alone (column indices; -1: not asked)."""

    code: str
    kind: str
    numeric: bool
    static_col: int = -1
    counts: np.ndarray | None = None  # categorical: a count column per window
    ever: int = -1
    days_since_first: int = -1
    cols: np.ndarray | None = None  # numeric: windows x NUMERIC_AGGS
    halves: np.ndarray | None = None  # EWM half-lives in years
    ewm: np.ndarray | None = None
    kalman: np.ndarray | None = None
    noise: np.ndarray | None = None

    @property
    def filtered(self) -> bool:
        return self.ewm is not None


@dataclass(frozen=True)
class _SpecPlan:
    n_features: int
    age_col: int
    lengths: np.ndarray
    codes: tuple[_CodePlan, ...]


_PLANS: dict[int, tuple[FeatureSpec, _SpecPlan]] = {}  # by id(spec), the spec kept alive
_PLANS_MAX = 32


def _spec_plan(spec: FeatureSpec) -> _SpecPlan:
    """What ``build_features`` needs from a spec, worked out once per spec (a service
    featurises one patient at a time: this was most of the Python work per call)."""
    hit = _PLANS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    col = {name: i for i, name in enumerate(spec.feature_names)}

    def column(code: str, window: str | None, agg: str, asked) -> int:
        return col[spec.feature_name(code, window, agg)] if agg in asked else -1

    codes = []
    for cf in spec.codes:
        if cf.kind == "static":
            codes.append(_CodePlan(cf.code, cf.kind, cf.numeric,
                                   static_col=col[spec.static_name(cf.code)]))
        elif cf.kind == "categorical":
            aggs = spec.categorical_aggregations
            codes.append(_CodePlan(
                cf.code, cf.kind, cf.numeric,
                counts=np.array([column(cf.code, w, "count", aggs) for w in spec.windows],
                                dtype=np.int64),
                ever=column(cf.code, None, "ever", aggs),
                days_since_first=column(cf.code, None, "days_since_first", aggs)))
        else:
            aggs = spec.numeric_aggregations
            cols = np.array([[column(cf.code, w, agg, aggs) for agg in NUMERIC_AGGS]
                             for w in spec.windows], dtype=np.int64).reshape(-1, len(NUMERIC_AGGS))
            halves = getattr(spec, "ewm_half_life_days", None) or []  # older specs: none
            kalman = getattr(cf, "kalman", None)
            extra = {}
            if halves or kalman is not None:
                extra = {
                    "halves": np.array(halves, dtype=np.float64) / DAYS_PER_YEAR,
                    "ewm": np.array([[col[spec.feature_name(cf.code, f"ewm{h}d", a)]
                                      for a in ("level", "trend")] for h in halves],
                                    dtype=np.int64).reshape(-1, 2),
                    "kalman": np.array([col[spec.feature_name(cf.code, "kalman", a)]
                                        for a in ("level", "slope")] if kalman is not None
                                       else [-1, -1], dtype=np.int64),
                    "noise": np.array(kalman if kalman is not None else [1.0] * 4)}
            codes.append(_CodePlan(cf.code, cf.kind, cf.numeric, cols=cols, **extra))
    plan = _SpecPlan(len(spec.feature_names), col.get("age_years", -1),
                     np.array([ALL_HISTORY if np.isinf(d) else int(d * US_PER_DAY)
                               for d in spec.window_days], dtype=np.int64), tuple(codes))
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[id(spec)] = (spec, plan)
    return plan


def build_features(
    arrays: EventArrays,
    subject_ids: np.ndarray,
    times_us: np.ndarray,
    spec: FeatureSpec,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """Feature matrix (float32, one row per query, columns ``spec.feature_names``).

    ``subject_ids``/``times_us`` are the prediction rows (any order); ``arrays`` holds
    those subjects' events (canonical order) and may hold events after the query times:
    they are never used.
    """
    plan = _spec_plan(spec)
    q_sid = np.asarray(subject_ids, dtype=np.int64)
    q_t = np.ascontiguousarray(times_us, dtype=np.int64)
    n = q_sid.size
    # one contiguous row per feature (column-major result): column writes stay in cache
    out = np.full((plan.n_features, n), np.nan, dtype=np.float32)
    if n == 0:
        return out.T
    ev_sid = arrays.subject_id
    if ev_sid.size and bool((ev_sid[1:] >= ev_sid[:-1]).all()):  # canonical: O(n) indices
        ev_subjects, starts, ends = subject_bounds(ev_sid)
        subjects = np.union1d(ev_subjects, np.unique(q_sid))
        e_sidx = np.repeat(np.searchsorted(subjects, ev_subjects), ends - starts)
    else:
        subjects = np.unique(np.concatenate((ev_sid, q_sid)))
        e_sidx = np.searchsorted(subjects, ev_sid)
    q_sidx = np.searchsorted(subjects, q_sid).astype(np.int64)
    timed = arrays.time_us != NAT_US
    cat_index = {c: i for i, c in enumerate(arrays.categories)}

    def rows_of(code: str) -> np.ndarray:
        i = cat_index.get(code)
        return np.empty(0, np.int64) if i is None else np.flatnonzero(arrays.code == i)

    if plan.age_col >= 0:
        rows = rows_of(BIRTH_CODE)
        rows = rows[timed[rows]]
        birth = np.full(subjects.size, NAT_US)
        # first birth event per subject wins (rows are in canonical order)
        first = np.unique(e_sidx[rows], return_index=True)
        birth[first[0]] = arrays.time_us[rows[first[1]]]
        b = birth[q_sidx]
        known = b != NAT_US
        out[plan.age_col, known] = (q_t[known] - b[known]) / (US_PER_DAY * DAYS_PER_YEAR)

    lengths = plan.lengths

    def one_code(cp: _CodePlan, rows: np.ndarray) -> None:
        if cp.kind == "static":
            rows = rows[~timed[rows]]
            present = np.zeros(subjects.size, dtype=bool)
            value = np.full(subjects.size, np.nan)
            uniq, first = np.unique(e_sidx[rows], return_index=True)
            present[uniq] = True
            value[uniq] = arrays.value[rows[first]]
            out[cp.static_col, :] = value[q_sidx] if cp.numeric else present[q_sidx]
            return
        rows = rows[timed[rows]]
        if cp.kind == "numeric":
            rows = rows[~np.isnan(arrays.value[rows])]
        ev = _CodeEvents(e_sidx[rows], arrays.time_us[rows], arrays.value[rows], subjects.size)
        if cp.kind == "categorical":
            _kernels.categorical(ev.offsets, ev.t, q_sidx, q_t, lengths, cp.counts, cp.ever,
                                 cp.days_since_first, out)
            return
        _kernels.numeric(ev.offsets, ev.t, ev.v, q_sidx, q_t, lengths, cp.cols, out)
        if cp.filtered:
            _kernels.filtered(ev.offsets, ev.t, ev.v, q_sidx, q_t, cp.halves, cp.ewm,
                              cp.noise, cp.kalman, out)

    work = [(cp, rows_of(cp.code)) for cp in plan.codes]
    # codes write disjoint rows of ``out``; the kernels release the GIL
    # (the core count only when it matters: os.cpu_count costs ~25 µs, a tenth of a
    # one-row build)
    threads = 1 if n < PARALLEL_MIN_ROWS else min(threads or os.cpu_count() or 1,
                                                  len(work) or 1)
    if threads > 1:
        # biggest codes first, so the threads finish together (longest-processing-time)
        work.sort(key=lambda item: -item[1].size)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda item: one_code(*item), work))
    else:
        for item in work:
            one_code(*item)
    return out.T
