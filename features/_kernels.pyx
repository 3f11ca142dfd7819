# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The window kernels of ``features.featurize``, compiled ahead of time (Cython).

Ahead of time, not just in time: a ``twincast features`` process and a service worker
start with the kernels ready — no JIT to import, no machine code to load from a cache
(about 0.4 s of every command's start when these were numba functions).  Each kernel
answers every query of one code in one call and releases the GIL, so codes run on all
cores.  Layouts (``features.featurize`` builds them): ``offsets[s]:offsets[s + 1]`` are
subject *s*'s rows of ``t``/``v``, in time order; ``out`` has one row per feature and
one column per query (float32); a column index of −1 means "not asked".
"""

from libc.math cimport NAN, exp, log, sqrt
from libc.stdint cimport int64_t

cdef double US_PER_DAY_F = 86_400_000_000.0
cdef double US_PER_YEAR = 86_400_000_000.0 * 365.25
# numeric aggregations, in the order of featurize.NUMERIC_AGGS
cdef enum:
    _LAST = 0
    _MEAN = 1
    _MIN = 2
    _MAX = 3
    _STD = 4
    _COUNT = 5
    _SLOPE = 6
    _DSL = 7
    _FIRST = 8
    _CH_FIRST = 9
    _CH_PREV = 10
    _TWM = 11
    _THEIL = 12
    N_AGGS = 13
    THEIL_SEN_POINTS = 20  # featurize.THEIL_SEN_POINTS
    MAX_PAIRS = 190  # THEIL_SEN_POINTS * (THEIL_SEN_POINTS - 1) / 2

N_NUMERIC_AGGS = N_AGGS
THEIL_POINTS = THEIL_SEN_POINTS


cdef inline Py_ssize_t _right(const int64_t[::1] t, Py_ssize_t lo, Py_ssize_t hi,
                              int64_t x) noexcept nogil:
    """First row of [lo, hi) whose time is after x (numpy's searchsorted, side right)."""
    cdef Py_ssize_t mid
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if t[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline Py_ssize_t _upto(const int64_t[::1] offsets, const int64_t[::1] t, int64_t s,
                             int64_t tq, Py_ssize_t* a) noexcept nogil:
    """Subject s's rows at or before tq: sets ``a[0]`` to its first row, returns the end."""
    a[0] = offsets[s]
    return _right(t, a[0], offsets[s + 1], tq)


def _check_shapes(const int64_t[::1] offsets, Py_ssize_t n_events,
                  const int64_t[::1] q_sidx, const int64_t[::1] q_t, float[:, ::1] out):
    """What the kernels index without bounds checks agrees (ValueError if not)."""
    if q_sidx.shape[0] != q_t.shape[0] or out.shape[1] != q_t.shape[0]:
        raise ValueError("q_sidx, q_t and the columns of out need one entry per query")
    if offsets.shape[0] == 0 or offsets[offsets.shape[0] - 1] > n_events:
        raise ValueError("offsets must end within the events")
    cdef Py_ssize_t i
    cdef int64_t n_subjects = offsets.shape[0] - 1
    for i in range(q_sidx.shape[0]):
        if not 0 <= q_sidx[i] < n_subjects:
            break
    else:
        return
    for i in range(q_sidx.shape[0]):
        if not 0 <= q_sidx[i] < offsets.shape[0] - 1:
            raise ValueError(f"query {i} names subject index {q_sidx[i]}, outside offsets")


cdef inline Py_ssize_t _window_start(const int64_t[::1] t, Py_ssize_t a, Py_ssize_t hi,
                                     int64_t tq, int64_t length) noexcept nogil:
    """First row of [a, hi) inside the window (tq − length, tq]."""
    if length < 0:
        return a
    return _right(t, a, hi, tq - length)


cdef double _select(double* x, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """The k-th smallest of x[0:n] (x is reordered: x[0:k] ≤ x[k] ≤ x[k+1:n])."""
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j
    cdef double pivot, tmp
    while lo < hi:
        pivot = x[lo + (hi - lo) // 2]
        i = lo
        j = hi
        while i <= j:
            while x[i] < pivot:
                i += 1
            while x[j] > pivot:
                j -= 1
            if i <= j:
                tmp = x[i]
                x[i] = x[j]
                x[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return x[k]


cdef double _theil_sen(const int64_t[::1] t, const double[::1] v, Py_ssize_t lo,
                       Py_ssize_t hi, double* pairs) noexcept nogil:
    """Median of the slopes (per year) between every two values of [lo, hi) at distinct
    times; NaN when all share one time."""
    cdef Py_ssize_t m = 0, j, k, half
    cdef double upper, lower
    for j in range(lo, hi):
        for k in range(j + 1, hi):
            if t[k] != t[j]:
                pairs[m] = (v[k] - v[j]) / (<double>(t[k] - t[j]) / US_PER_YEAR)
                m += 1
    if m == 0:
        return NAN
    half = m // 2
    upper = _select(pairs, m, half)
    if m % 2 == 1:
        return upper
    lower = pairs[0]  # the largest of the lower half is the (half − 1)-th smallest
    for j in range(1, half):
        if pairs[j] > lower:
            lower = pairs[j]
    return (lower + upper) / 2


def numeric(const int64_t[::1] offsets, const int64_t[::1] t, const double[::1] v,
            const int64_t[::1] q_sidx, const int64_t[::1] q_t, const int64_t[::1] lengths,
            const int64_t[:, ::1] cols, float[:, ::1] out):
    """Numeric aggregations of one code for every query: ``lengths[w]`` is window *w* in
    µs (−1 for all history); ``cols[w, a]`` is the row of ``out`` for window *w* and
    aggregation *a* (``featurize.NUMERIC_AGGS``)."""
    _check_shapes(offsets, min(t.shape[0], v.shape[0]), q_sidx, q_t, out)
    if cols.shape[1] != N_AGGS or cols.shape[0] != lengths.shape[0]:
        raise ValueError(f"cols needs one row per window and {N_AGGS} columns")
    cdef double pairs[MAX_PAIRS]
    cdef Py_ssize_t i, w, j, a, hi, lo, k, distinct
    cdef int64_t tq, t0
    cdef const int64_t* c
    cdef double tw, sw, d, acc, y0, sy, sx, lo_v, hi_v, y, my, mx, syy, sxx, sxy, dy, dx
    with nogil:
        for i in range(q_t.shape[0]):
            tq = q_t[i]
            hi = _upto(offsets, t, q_sidx[i], tq, &a)
            for w in range(lengths.shape[0]):
                c = &cols[w, 0]
                lo = _window_start(t, a, hi, tq, lengths[w])
                k = hi - lo
                if c[_COUNT] >= 0:
                    out[c[_COUNT], i] = k
                if k == 0:
                    continue
                if c[_LAST] >= 0:
                    out[c[_LAST], i] = v[hi - 1]
                if c[_DSL] >= 0:
                    out[c[_DSL], i] = <double>(tq - t[hi - 1]) / US_PER_DAY_F
                if c[_FIRST] >= 0:
                    out[c[_FIRST], i] = v[lo]
                if k >= 2 and c[_CH_FIRST] >= 0:
                    out[c[_CH_FIRST], i] = v[hi - 1] - v[lo]
                if k >= 2 and c[_CH_PREV] >= 0:
                    out[c[_CH_PREV], i] = v[hi - 1] - v[hi - 2]
                if c[_TWM] >= 0:  # each value holds until the next one (the last until t)
                    tw = 0.0
                    sw = 0.0
                    for j in range(lo, hi):
                        d = <double>((t[j + 1] if j + 1 < hi else tq) - t[j]) / US_PER_DAY_F
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
                y0 = v[lo]
                t0 = t[lo]
                sy = 0.0
                sx = 0.0
                lo_v = y0
                hi_v = y0
                distinct = 1
                for j in range(lo, hi):
                    y = v[j]
                    sy += y - y0
                    sx += <double>(t[j] - t0) / US_PER_YEAR
                    if y < lo_v:
                        lo_v = y
                    if y > hi_v:
                        hi_v = y
                    if j > lo and t[j] != t[j - 1]:
                        distinct += 1
                my = sy / k
                mx = sx / k
                if c[_MEAN] >= 0:
                    out[c[_MEAN], i] = y0 + my
                if c[_MIN] >= 0:
                    out[c[_MIN], i] = lo_v
                if c[_MAX] >= 0:
                    out[c[_MAX], i] = hi_v
                if k < 2 or (c[_STD] < 0 and c[_SLOPE] < 0):
                    continue
                # second pass: sums of squared and crossed deviations from the window means
                syy = 0.0
                sxx = 0.0
                sxy = 0.0
                for j in range(lo, hi):
                    dy = v[j] - y0 - my
                    dx = <double>(t[j] - t0) / US_PER_YEAR - mx
                    syy += dy * dy
                    sxx += dx * dx
                    sxy += dx * dy
                if c[_STD] >= 0:
                    out[c[_STD], i] = sqrt(syy / (k - 1))
                if c[_SLOPE] >= 0 and distinct >= 2:
                    out[c[_SLOPE], i] = sxy / sxx


def filtered(const int64_t[::1] offsets, const int64_t[::1] t, const double[::1] v,
             const int64_t[::1] q_sidx, const int64_t[::1] q_t,
             const double[::1] half_lives, const int64_t[:, ::1] ewm_cols,
             const double[::1] noise, const int64_t[::1] kalman_cols, float[:, ::1] out):
    """Per query, over the subject's values up to t: for each half-life (years) an
    exponentially weighted level and trend (Holt's method with weights for irregular
    times), and a local-linear-trend Kalman filter (``noise``: measurement, level and
    slope variances, the slope's initial variance; filtering only) — levels carried
    forward to t along their trend, slopes per year."""
    _check_shapes(offsets, min(t.shape[0], v.shape[0]), q_sidx, q_t, out)
    if noise.shape[0] != 4 or kalman_cols.shape[0] != 2 or ewm_cols.shape[1] != 2 \
            or ewm_cols.shape[0] != half_lives.shape[0]:
        raise ValueError("noise needs 4 values, kalman_cols 2, ewm_cols 2 columns and a "
                         "row per half-life")
    cdef Py_ssize_t i, h, j, a, hi
    cdef int64_t tq
    cdef double ahead, level, trend, d, alpha, prev, r, q_l, q_s, x0, x1, p00, p01, p11
    cdef double n00, n01, n11, sk, k0, k1, innov
    cdef double ln2 = log(2.0)
    with nogil:
        for i in range(q_t.shape[0]):
            tq = q_t[i]
            hi = _upto(offsets, t, q_sidx[i], tq, &a)
            if hi == a:
                continue
            ahead = <double>(tq - t[hi - 1]) / US_PER_YEAR
            for h in range(half_lives.shape[0]):
                level = v[a]
                trend = 0.0
                for j in range(a + 1, hi):
                    d = <double>(t[j] - t[j - 1]) / US_PER_YEAR
                    alpha = 1.0 - exp(-ln2 * d / half_lives[h])
                    prev = level
                    level = alpha * v[j] + (1.0 - alpha) * (level + trend * d)
                    if d > 0:
                        trend = alpha * (level - prev) / d + (1.0 - alpha) * trend
                out[ewm_cols[h, 0], i] = level + trend * ahead
                out[ewm_cols[h, 1], i] = trend
            if kalman_cols[0] < 0:
                continue
            r = noise[0]
            q_l = noise[1]
            q_s = noise[2]
            x0 = v[a]  # state: level, slope
            x1 = 0.0
            p00 = r
            p01 = 0.0
            p11 = noise[3]
            for j in range(a + 1, hi):
                d = <double>(t[j] - t[j - 1]) / US_PER_YEAR
                # predict: x ← F x, P ← F P Fᵀ + Q(d) (integrated random walk on the slope)
                x0 = x0 + d * x1
                n00 = p00 + 2 * d * p01 + d * d * p11 + q_l * d + q_s * (d * (d * d)) / 3
                n01 = p01 + d * p11 + q_s * d * d / 2
                n11 = p11 + q_s * d
                # update with the measurement of the level
                sk = n00 + r
                k0 = n00 / sk
                k1 = n01 / sk
                innov = v[j] - x0
                x0 += k0 * innov
                x1 += k1 * innov
                p00 = (1 - k0) * n00
                p01 = (1 - k0) * n01
                p11 = n11 - k1 * n01
            out[kalman_cols[0], i] = x0 + x1 * ahead
            out[kalman_cols[1], i] = x1


def categorical(const int64_t[::1] offsets, const int64_t[::1] t,
                const int64_t[::1] q_sidx, const int64_t[::1] q_t,
                const int64_t[::1] lengths, const int64_t[::1] count_cols,
                int64_t ever_col, int64_t first_col, float[:, ::1] out):
    """Ever, days since first and count per window of one code for every query."""
    _check_shapes(offsets, t.shape[0], q_sidx, q_t, out)
    if count_cols.shape[0] != lengths.shape[0]:
        raise ValueError("count_cols needs one column per window")
    cdef Py_ssize_t i, w, a, hi
    cdef int64_t tq
    with nogil:
        for i in range(q_t.shape[0]):
            tq = q_t[i]
            hi = _upto(offsets, t, q_sidx[i], tq, &a)
            if ever_col >= 0:
                out[ever_col, i] = 1.0 if hi > a else 0.0
            if first_col >= 0 and hi > a:
                out[first_col, i] = <double>(tq - t[a]) / US_PER_DAY_F
            for w in range(lengths.shape[0]):
                if count_cols[w] >= 0:
                    out[count_cols[w], i] = hi - _window_start(t, a, hi, tq, lengths[w])
