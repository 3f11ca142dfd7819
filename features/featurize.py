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
one offset per subject.  A compiled kernel (numba) then answers every query in a single
pass: two binary searches in the subject's own events give the window's row range, and
one sweep over exactly those rows gives every aggregation (two passes for std and slope,
centred on the window's own means).  A query's numbers therefore depend only on its own
subject's events at or before *t* — never on who else is in the batch — and the kernel
releases the GIL, so codes run on all cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from features.events import BIRTH_CODE, NAT_US, EventArrays, subject_bounds
from features.spec import FeatureSpec
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY

PARALLEL_MIN_ROWS = 20_000  # below this, threads cost more than they save
ALL_HISTORY = -1  # window length (µs) meaning "all history"
# numeric aggregations in the kernel's column order
NUMERIC_AGGS = ("last", "mean", "min", "max", "std", "count", "slope", "days_since_last",
                "first", "change_since_first", "change_since_previous", "time_weighted_mean",
                "theil_sen_slope")
(_LAST, _MEAN, _MIN, _MAX, _STD, _COUNT, _SLOPE, _DSL, _FIRST, _CH_FIRST, _CH_PREV, _TWM,
 _THEIL) = range(len(NUMERIC_AGGS))
THEIL_SEN_POINTS = 20  # a window's Theil–Sen slope uses its last 20 values at most
_US_PER_YEAR = US_PER_DAY * DAYS_PER_YEAR


# --------------------------------------------------------------------------- kernels


@numba.njit(cache=True, nogil=True)
def _window_start(t, a, hi, tq, length):
    """First row of [a, hi) inside the window (tq − length, tq]."""
    if length < 0:
        return a
    return a + np.searchsorted(t[a:hi], tq - length, side="right")


@numba.njit(cache=True, nogil=True)
def _numeric_kernel(offsets, t, v, q_sidx, q_t, lengths, cols, out):
    """Numeric aggregations of one code for every query.

    ``offsets[s]:offsets[s + 1]`` are subject *s*'s rows of ``t``/``v`` (time order);
    ``lengths[w]`` is window *w* in µs (``ALL_HISTORY`` for all); ``cols[w, a]`` is the
    row of ``out`` for window *w* and aggregation *a* (``NUMERIC_AGGS``), −1 if not asked.
    """
    pairs = np.empty(THEIL_SEN_POINTS * (THEIL_SEN_POINTS - 1) // 2)
    for i in range(q_t.size):
        s, tq = q_sidx[i], q_t[i]
        a, b = offsets[s], offsets[s + 1]
        hi = a + np.searchsorted(t[a:b], tq, side="right")
        for w in range(lengths.size):
            c = cols[w]
            lo = _window_start(t, a, hi, tq, lengths[w])
            k = hi - lo
            if c[_COUNT] >= 0:
                out[c[_COUNT], i] = k
            if k == 0:
                continue
            if c[_LAST] >= 0:
                out[c[_LAST], i] = v[hi - 1]
            if c[_DSL] >= 0:
                out[c[_DSL], i] = (tq - t[hi - 1]) / US_PER_DAY
            if c[_FIRST] >= 0:
                out[c[_FIRST], i] = v[lo]
            if k >= 2 and c[_CH_FIRST] >= 0:
                out[c[_CH_FIRST], i] = v[hi - 1] - v[lo]
            if k >= 2 and c[_CH_PREV] >= 0:
                out[c[_CH_PREV], i] = v[hi - 1] - v[hi - 2]
            if c[_TWM] >= 0:  # each value holds until the next one (the last until t)
                tw = sw = 0.0
                for j in range(lo, hi):
                    d = ((t[j + 1] if j + 1 < hi else tq) - t[j]) / US_PER_DAY
                    tw += d
                    sw += d * v[j]
                if tw > 0:
                    out[c[_TWM], i] = sw / tw
                else:  # every value at t itself
                    acc = 0.0
                    for j in range(lo, hi):
                        acc += v[j]
                    out[c[_TWM], i] = acc / k
            if c[_THEIL] >= 0 and k >= 2:
                out[c[_THEIL], i] = _theil_sen(t, v, max(lo, hi - THEIL_SEN_POINTS), hi,
                                               pairs)
            # first pass: centred sums (on the window's first value and time), extremes
            y0, t0 = v[lo], t[lo]
            sy = sx = 0.0
            lo_v = hi_v = y0
            distinct = 1
            for j in range(lo, hi):
                y = v[j]
                sy += y - y0
                sx += (t[j] - t0) / _US_PER_YEAR
                if y < lo_v:
                    lo_v = y
                if y > hi_v:
                    hi_v = y
                if j > lo and t[j] != t[j - 1]:
                    distinct += 1
            my, mx = sy / k, sx / k
            if c[_MEAN] >= 0:
                out[c[_MEAN], i] = y0 + my
            if c[_MIN] >= 0:
                out[c[_MIN], i] = lo_v
            if c[_MAX] >= 0:
                out[c[_MAX], i] = hi_v
            if k < 2 or (c[_STD] < 0 and c[_SLOPE] < 0):
                continue
            # second pass: sums of squared and crossed deviations from the window means
            syy = sxx = sxy = 0.0
            for j in range(lo, hi):
                dy = v[j] - y0 - my
                dx = (t[j] - t0) / _US_PER_YEAR - mx
                syy += dy * dy
                sxx += dx * dx
                sxy += dx * dy
            if c[_STD] >= 0:
                out[c[_STD], i] = np.sqrt(syy / (k - 1))
            if c[_SLOPE] >= 0 and distinct >= 2:
                out[c[_SLOPE], i] = sxy / sxx


@numba.njit(cache=True, nogil=True)
def _theil_sen(t, v, lo, hi, pairs):
    """Median of the slopes (per year) between every two values of [lo, hi) at distinct
    times; NaN when all share one time."""
    m = 0
    for j in range(lo, hi):
        for k in range(j + 1, hi):
            if t[k] != t[j]:
                pairs[m] = (v[k] - v[j]) / ((t[k] - t[j]) / _US_PER_YEAR)
                m += 1
    if m == 0:
        return np.nan
    return np.median(pairs[:m])


@numba.njit(cache=True, nogil=True)
def _filter_kernel(offsets, t, v, q_sidx, q_t, half_lives, ewm_cols, noise, kalman_cols,
                   out):
    """Per query, over the subject's values up to t: for each half-life (years) an
    exponentially weighted level and trend (Holt's method with weights for irregular
    times), and a local-linear-trend Kalman filter (``noise``: measurement, level and
    slope variances, the slope's initial variance; filtering only) — levels carried
    forward to t along their trend, slopes per year."""
    for i in range(q_t.size):
        s, tq = q_sidx[i], q_t[i]
        a, b = offsets[s], offsets[s + 1]
        hi = a + np.searchsorted(t[a:b], tq, side="right")
        if hi == a:
            continue
        ahead = (tq - t[hi - 1]) / _US_PER_YEAR
        for h in range(half_lives.size):
            level, trend = v[a], 0.0
            for j in range(a + 1, hi):
                d = (t[j] - t[j - 1]) / _US_PER_YEAR
                alpha = 1.0 - np.exp(-np.log(2.0) * d / half_lives[h])
                prev = level
                level = alpha * v[j] + (1.0 - alpha) * (level + trend * d)
                if d > 0:
                    trend = alpha * (level - prev) / d + (1.0 - alpha) * trend
            out[ewm_cols[h, 0], i] = level + trend * ahead
            out[ewm_cols[h, 1], i] = trend
        if kalman_cols[0] < 0:
            continue
        r, q_l, q_s = noise[0], noise[1], noise[2]
        x0, x1 = v[a], 0.0  # state: level, slope
        p00, p01, p11 = r, 0.0, noise[3]
        for j in range(a + 1, hi):
            d = (t[j] - t[j - 1]) / _US_PER_YEAR
            # predict: x ← F x, P ← F P Fᵀ + Q(d) (integrated random walk on the slope)
            x0 = x0 + d * x1
            n00 = p00 + 2 * d * p01 + d * d * p11 + q_l * d + q_s * d ** 3 / 3
            n01 = p01 + d * p11 + q_s * d * d / 2
            n11 = p11 + q_s * d
            # update with the measurement of the level
            sk = n00 + r
            k0, k1 = n00 / sk, n01 / sk
            innov = v[j] - x0
            x0 += k0 * innov
            x1 += k1 * innov
            p00, p01, p11 = (1 - k0) * n00, (1 - k0) * n01, n11 - k1 * n01
        out[kalman_cols[0], i] = x0 + x1 * ahead
        out[kalman_cols[1], i] = x1


@numba.njit(cache=True, nogil=True)
def _categorical_kernel(offsets, t, q_sidx, q_t, lengths, count_cols, ever_col, first_col,
                        out):
    """Ever, days since first and count per window of one code for every query."""
    for i in range(q_t.size):
        s, tq = q_sidx[i], q_t[i]
        a, b = offsets[s], offsets[s + 1]
        hi = a + np.searchsorted(t[a:b], tq, side="right")
        if ever_col >= 0:
            out[ever_col, i] = 1.0 if hi > a else 0.0
        if first_col >= 0 and hi > a:
            out[first_col, i] = (tq - t[a]) / US_PER_DAY
        for w in range(lengths.size):
            if count_cols[w] >= 0:
                out[count_cols[w], i] = hi - _window_start(t, a, hi, tq, lengths[w])


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
    q_sid = np.asarray(subject_ids, dtype=np.int64)
    q_t = np.ascontiguousarray(times_us, dtype=np.int64)
    n = q_sid.size
    # one contiguous row per feature (column-major result): column writes stay in cache
    out = np.full((len(spec.feature_names), n), np.nan, dtype=np.float32)
    if n == 0:
        return out.T
    col = {name: i for i, name in enumerate(spec.feature_names)}
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

    if "age_years" in col:
        rows = rows_of(BIRTH_CODE)
        rows = rows[timed[rows]]
        birth = np.full(subjects.size, NAT_US)
        # first birth event per subject wins (rows are in canonical order)
        first = np.unique(e_sidx[rows], return_index=True)
        birth[first[0]] = arrays.time_us[rows[first[1]]]
        b = birth[q_sidx]
        known = b != NAT_US
        out[col["age_years"], known] = (q_t[known] - b[known]) / (US_PER_DAY * DAYS_PER_YEAR)

    lengths = np.array([ALL_HISTORY if np.isinf(d) else int(d * US_PER_DAY)
                        for d in spec.window_days], dtype=np.int64)

    def column(code: str, window: str | None, agg: str, asked) -> int:
        return col[spec.feature_name(code, window, agg)] if agg in asked else -1

    def one_code(cf, rows: np.ndarray) -> None:
        if cf.kind == "static":
            rows = rows[~timed[rows]]
            present = np.zeros(subjects.size, dtype=bool)
            value = np.full(subjects.size, np.nan)
            uniq, first = np.unique(e_sidx[rows], return_index=True)
            present[uniq] = True
            value[uniq] = arrays.value[rows[first]]
            name = spec.static_name(cf.code)
            out[col[name], :] = value[q_sidx] if cf.numeric else present[q_sidx]
            return
        rows = rows[timed[rows]]
        if cf.kind == "numeric":
            rows = rows[~np.isnan(arrays.value[rows])]
        ev = _CodeEvents(e_sidx[rows], arrays.time_us[rows], arrays.value[rows], subjects.size)
        if cf.kind == "categorical":
            aggs = spec.categorical_aggregations
            counts = np.array([column(cf.code, w, "count", aggs) for w in spec.windows],
                              dtype=np.int64)
            _categorical_kernel(ev.offsets, ev.t, q_sidx, q_t, lengths, counts,
                                column(cf.code, None, "ever", aggs),
                                column(cf.code, None, "days_since_first", aggs), out)
        else:
            aggs = spec.numeric_aggregations
            cols = np.array([[column(cf.code, w, agg, aggs) for agg in NUMERIC_AGGS]
                             for w in spec.windows], dtype=np.int64).reshape(-1, len(NUMERIC_AGGS))
            _numeric_kernel(ev.offsets, ev.t, ev.v, q_sidx, q_t, lengths, cols, out)
            halves = getattr(spec, "ewm_half_life_days", None) or []  # older specs: none
            kalman = getattr(cf, "kalman", None)
            if halves or kalman is not None:
                ewm = np.array([[col[spec.feature_name(cf.code, f"ewm{h}d", a)]
                                 for a in ("level", "trend")] for h in halves],
                               dtype=np.int64).reshape(-1, 2)
                kal = np.array([col[spec.feature_name(cf.code, "kalman", a)]
                                for a in ("level", "slope")] if kalman is not None
                               else [-1, -1], dtype=np.int64)
                noise = np.array(kalman if kalman is not None else [1.0] * 4)
                _filter_kernel(ev.offsets, ev.t, ev.v, q_sidx, q_t,
                               np.array(halves, dtype=np.float64) / DAYS_PER_YEAR, ewm,
                               noise, kal, out)

    work = [(cf, rows_of(cf.code)) for cf in spec.codes]
    # codes write disjoint rows of ``out``; the kernels release the GIL
    threads = min(threads or os.cpu_count() or 1, len(work) or 1)
    if threads > 1 and n >= PARALLEL_MIN_ROWS:
        # biggest codes first, so the threads finish together (longest-processing-time)
        work.sort(key=lambda item: -item[1].size)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda item: one_code(*item), work))
    else:
        for item in work:
            one_code(*item)
    return out.T
