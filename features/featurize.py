"""Point-in-time features: one function for a training set of millions of rows and for
one patient in the service, so offline and online features are identical by construction.

Features at *t* use only events with ``time <= t`` (static facts always).  A window *w*
covers (*t* − *w*, *t*]; ``all`` covers all history.  Per numeric code and window: last,
mean, min, max, std (ddof 1), count, slope (OLS, per year; missing with fewer than two
distinct times) and days since last; per categorical code: ever, count per window and
days since first; plus age at *t* and static facts.  Missing stays NaN, never zero.

How it is fast and exact: events of a code are sorted by (subject, time); every query is
turned into a row range with ``searchsorted`` on exact (subject, time-rank) keys; sums,
minima and maxima are ``ufunc.reduceat`` over each range's own rows (so a subject's
numbers never depend on who else is in the batch); counts come from exact integer prefix
sums.  No Python loop per row.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from features.events import BIRTH_CODE, NAT_US, EventArrays, subject_bounds
from features.spec import FeatureSpec
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY, SpanKeys, TimeIndex

_NEG_INF_US = np.iinfo(np.int64).min + 1
PARALLEL_MIN_ROWS = 20_000  # below this, threads cost more than they save


class _CodeEvents:
    """One code's events (timed), sorted by subject then time, with subject segments."""

    def __init__(self, sidx: np.ndarray, t: np.ndarray, v: np.ndarray, keys: np.ndarray):
        self.sidx, self.t, self.v = sidx, t, v
        self.keys = keys
        n = sidx.size
        change = np.flatnonzero(np.diff(sidx)) + 1 if n else np.empty(0, np.int64)
        self.seg_starts = np.concatenate(([0], change)).astype(np.int64) if n else change
        self.seg_lengths = np.diff(np.concatenate((self.seg_starts, [n]))) if n else change
        self.seg_of = np.repeat(np.arange(self.seg_starts.size), self.seg_lengths)

    def __len__(self) -> int:
        return int(self.sidx.size)


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
    q_t = np.asarray(times_us, dtype=np.int64)
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
    q_sidx = np.searchsorted(subjects, q_sid)
    timed = arrays.time_us != NAT_US
    # only the events that become windowed features need keys (not birth, not admin …)
    used = np.zeros(len(arrays.categories), dtype=bool)
    cat_pos = {c: i for i, c in enumerate(arrays.categories)}
    for cf in spec.codes:
        if cf.kind != "static" and cf.code in cat_pos:
            used[cat_pos[cf.code]] = True
    keyed = timed & used[arrays.code] if used.size else timed & False
    fast = SpanKeys.build_with_keys(e_sidx[keyed], arrays.time_us[keyed], subjects.size)
    if fast is not None:
        index, keyed_keys = fast
    else:
        index, keyed_keys = TimeIndex.build_with_keys(e_sidx[keyed], arrays.time_us[keyed])
    event_keys = np.zeros(len(arrays), dtype=np.int64)
    event_keys[keyed] = keyed_keys
    windows = list(zip(spec.windows, spec.window_days, strict=True))
    bounds_cache: dict[tuple[float, ...], np.ndarray] = {}

    def lower_keys(days: float) -> np.ndarray:
        if days not in bounds_cache:
            start = np.full(n, _NEG_INF_US) if np.isinf(days) else q_t - int(days * US_PER_DAY)
            bounds_cache[days] = index.upto_keys(q_sidx, start)
        return bounds_cache[days]

    upper = index.upto_keys(q_sidx, q_t)
    cat_index = {c: i for i, c in enumerate(arrays.categories)}
    rows_cache: dict[str, np.ndarray] = {}

    def rows_of(code: str) -> np.ndarray:
        """The code's rows, in canonical (subject, time) order."""
        if code not in rows_cache:
            i = cat_index.get(code)
            rows_cache[code] = (np.empty(0, np.int64) if i is None
                                else np.flatnonzero(arrays.code == i))
        return rows_cache[code]

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

    for _, days in windows:
        lower_keys(days)  # fill the cache before threads share it
    lower_keys(np.inf)

    def one_code(cf) -> None:
        rows = rows_of(cf.code)
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
        ev = _CodeEvents(e_sidx[rows], arrays.time_us[rows], arrays.value[rows],
                         event_keys[rows])
        hi = np.searchsorted(ev.keys, upper, side="right")
        lo_all = np.searchsorted(ev.keys, lower_keys(np.inf), side="right")
        if cf.kind == "categorical":
            _categorical(out, col, spec, cf.code, ev, q_t, lower_keys, hi, lo_all, windows)
        else:
            _numeric(out, col, spec, cf.code, ev, q_t, lower_keys, hi, lo_all, windows)

    # codes write disjoint rows of ``out``; numpy releases the GIL in the heavy loops
    threads = min(threads or os.cpu_count() or 1, len(spec.codes) or 1)
    if threads > 1 and n >= PARALLEL_MIN_ROWS:
        # biggest codes first, so the threads finish together (longest-processing-time)
        by_size = sorted(spec.codes, key=lambda cf: -len(rows_of(cf.code)))
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one_code, by_size))
    else:
        for cf in spec.codes:
            one_code(cf)
    return out.T


def _categorical(out, col, spec, code, ev, q_t, lower_keys, hi, lo_all, windows) -> None:
    aggs = spec.categorical_aggregations
    has = hi > lo_all
    if "ever" in aggs:
        out[col[spec.feature_name(code, None, "ever")], :] = has
    if "days_since_first" in aggs and len(ev):
        first_t = ev.t[np.where(has, lo_all, 0)]
        out[col[spec.feature_name(code, None, "days_since_first")], has] = (
            (q_t[has] - first_t[has]) / US_PER_DAY
        )
    if "count" in aggs:
        for w, days in windows:
            lo = lo_all if np.isinf(days) else np.searchsorted(ev.keys, lower_keys(days),
                                                                 side="right")
            out[col[spec.feature_name(code, w, "count")], :] = hi - lo


def padded(values: np.ndarray) -> np.ndarray:
    """``values`` with one trailing zero row, so a range may end at ``len(values)``."""
    return np.concatenate((values, np.zeros((1, *values.shape[1:]), values.dtype)))


def ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Interleaved range bounds (lo₀, hi₀, lo₁, hi₁, …) for :func:`range_reduce`."""
    idx = np.empty(2 * lo.size, dtype=np.intp)
    idx[0::2], idx[1::2] = lo, hi
    return idx


def range_reduce(ufunc: np.ufunc, values_padded: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``ufunc`` over ``values[lo:hi]`` for each non-empty range, in one C loop.

    Every other ``reduceat`` result is a range, reduced over exactly its own elements in
    order, so a subject's numbers never depend on anyone else's.
    """
    return ufunc.reduceat(values_padded, idx, axis=0)[0::2]


def _numeric(out, col, spec, code, ev, q_t, lower_keys, hi, lo_all, windows) -> None:
    aggs = set(spec.numeric_aggregations)
    m = len(ev)
    if m == 0:
        if "count" in aggs:
            for w, _ in windows:
                out[col[spec.feature_name(code, w, "count")], :] = 0
        return
    # centre on each subject's first value and time so the sums stay well conditioned
    ref_y = ev.v[ev.seg_starts][ev.seg_of]
    ref_t = ev.t[ev.seg_starts][ev.seg_of]
    y = ev.v - ref_y
    x = (ev.t - ref_t) / (US_PER_DAY * DAYS_PER_YEAR)
    terms = (y, y * y, x, x * x, x * y)  # 1-D rows: reduceat is fastest on contiguous data
    # distinct times: integer prefix sums are exact, so one global cumsum will do
    new_time = np.ones(m, dtype=np.int64)
    new_time[1:] = (ev.t[1:] != ev.t[:-1]) | (ev.sidx[1:] != ev.sidx[:-1])
    before = np.concatenate(([0], np.cumsum(new_time)))
    padded_terms = [padded(t_) for t_ in terms]
    v_padded = padded(ev.v)
    last_idx = np.maximum(hi - 1, 0)
    for w, days in windows:
        lo = lo_all if np.isinf(days) else np.maximum(
            np.searchsorted(ev.keys, lower_keys(days), side="right"), lo_all)
        cnt = hi - lo
        has = cnt > 0
        name = lambda agg, w=w: col[spec.feature_name(code, w, agg)]  # noqa: E731
        if "count" in aggs:
            out[name("count"), :] = cnt
        if not has.any():
            continue
        rows = np.flatnonzero(has)
        last_h = last_idx[rows]
        v_last = ev.v[last_h]
        if "last" in aggs:
            out[name("last"), rows] = v_last
        if "days_since_last" in aggs:
            out[name("days_since_last"), rows] = (q_t[rows] - ev.t[last_h]) / US_PER_DAY
        # a window with one value needs no reduction: min = max = mean = that value
        one = cnt[rows] == 1
        rows_one, v_one = rows[one], v_last[one]
        for agg in ("min", "max", "mean"):
            if agg in aggs:
                out[name(agg), rows_one] = v_one
        many = rows[~one]
        if many.size == 0:
            continue
        lo_h, hi_h, last_m = lo[many], hi[many], last_idx[many]
        idx = ranges(lo_h, hi_h)
        if "min" in aggs:
            out[name("min"), many] = range_reduce(np.minimum, v_padded, idx)
        if "max" in aggs:
            out[name("max"), many] = range_reduce(np.maximum, v_padded, idx)
        if not aggs & {"mean", "std", "slope"}:
            continue
        sy, syy, sx, sxx, sxy = (range_reduce(np.add, t_, idx) for t_ in padded_terms)
        k = cnt[many].astype(np.float64)
        if "mean" in aggs:
            out[name("mean"), many] = sy / k + ref_y[last_m]
        if "std" in aggs:
            var = np.maximum(syy - sy * sy / k, 0.0) / (k - 1)
            out[name("std"), many] = np.sqrt(var)
        if "slope" in aggs:
            # distinct times in [lo, hi): the first counts, later ones if they are new
            distinct = before[hi_h] - before[lo_h + 1] + 1
            ok = distinct >= 2
            den = sxx - sx * sx / k
            num = sxy - sx * sy / k
            out[name("slope"), many[ok]] = num[ok] / den[ok]
