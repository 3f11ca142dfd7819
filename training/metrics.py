"""Censoring-aware metrics, each computed for many weightings at once.

Every metric takes the scores, the labels and a weight *matrix* ``W`` (rows × columns).
A column is one weighting of the rows: IPCW weights times, for a bootstrap replicate,
how often the row's subject was drawn (and optionally 1/visits per patient).  Sorting
depends only on the scores, so one sort serves every replicate: a subject bootstrap of
200 resamples costs a few matrix sums, all O(n log n).

Labels are 1/0 for observed rows; censored rows have zero weight.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from features.labels import COMPETING, OUTCOME

CLINICAL_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)


def _as_2d(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w[:, None] if w.ndim == 1 else w


def _groups_desc(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order by descending score and the start of each run of equal scores."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    return order, starts


def auroc(scores: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted AUROC per column of ``w`` (ties count one half)."""
    w = _as_2d(w)
    y = np.nan_to_num(y)
    order, starts = _groups_desc(scores)
    pos = np.add.reduceat((w * y[:, None])[order], starts, axis=0)
    neg = np.add.reduceat((w * (1 - y)[:, None])[order], starts, axis=0)
    pos_before = np.cumsum(pos, axis=0) - pos
    num = (neg * (pos_before + 0.5 * pos)).sum(axis=0)
    den = pos.sum(axis=0) * neg.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def roc_curve(scores: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted (false positive rate, true positive rate) at each distinct threshold."""
    w = np.asarray(w, dtype=np.float64)
    y = np.nan_to_num(y)
    order, starts = _groups_desc(scores)
    tp = np.cumsum(np.add.reduceat((w * y)[order], starts))
    fp = np.cumsum(np.add.reduceat((w * (1 - y))[order], starts))
    return (np.concatenate(([0.0], fp / max(fp[-1], 1e-300))),
            np.concatenate(([0.0], tp / max(tp[-1], 1e-300))))


def auprc(scores: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted average precision per column (as scikit-learn defines it)."""
    w = _as_2d(w)
    y = np.nan_to_num(y)
    order, starts = _groups_desc(scores)
    tp = np.cumsum(np.add.reduceat((w * y[:, None])[order], starts, axis=0), axis=0)
    fp = np.cumsum(np.add.reduceat((w * (1 - y)[:, None])[order], starts, axis=0), axis=0)
    total = tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / total
        d_recall = np.diff(np.vstack([np.zeros((1, w.shape[1])), recall]), axis=0)
        return np.where(total > 0, (d_recall * precision).sum(axis=0), np.nan)


def brier(scores: np.ndarray, y: np.ndarray, w: np.ndarray, w_all: np.ndarray) -> np.ndarray:
    """IPCW Brier score: weighted squared error over observed rows divided by the weight
    of all rows (censored ones included), as Graf et al. define it."""
    w, w_all = _as_2d(w), _as_2d(w_all)
    err = (np.nan_to_num(y) - scores) ** 2
    return (w * err[:, None]).sum(axis=0) / w_all.sum(axis=0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def calibration_in_the_large(scores: np.ndarray, y: np.ndarray, w: np.ndarray,
                             iterations: int = 25) -> np.ndarray:
    """Intercept of a weighted logistic regression of the outcome with logit(risk) as an
    offset (slope fixed at 1): 0 when predicted and observed risk agree on average."""
    w = _as_2d(w)
    y = np.nan_to_num(y)[:, None]
    z = _logit(scores)[:, None]
    a = np.zeros(w.shape[1])
    for _ in range(iterations):
        p = expit(a + z)
        g = (w * (y - p)).sum(axis=0)
        h = (w * p * (1 - p)).sum(axis=0)
        step = np.where(h > 0, g / np.maximum(h, 1e-12), 0)
        a = a + step
        if np.abs(step).max() < 1e-10:  # Newton converges in a handful of steps
            break
    return a


def recalibration(scores: np.ndarray, y: np.ndarray, w: np.ndarray,
                  iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and calibration slope of the weighted logistic regression of the outcome
    on logit(risk), per column (slope 1 is ideal; below 1, risks are too extreme)."""
    w = _as_2d(w)
    y = np.nan_to_num(y)[:, None]
    z = _logit(scores)[:, None]
    a, b = np.zeros(w.shape[1]), np.ones(w.shape[1])
    for _ in range(iterations):
        p = expit(a + b * z)
        r = w * (y - p)
        v = w * p * (1 - p)
        g0, g1 = r.sum(axis=0), (r * z).sum(axis=0)
        h00, h01, h11 = v.sum(axis=0), (v * z).sum(axis=0), (v * z * z).sum(axis=0)
        det = h00 * h11 - h01 * h01
        ok = det > 1e-12
        safe = np.where(ok, det, 1.0)
        da = np.where(ok, (h11 * g0 - h01 * g1) / safe, 0)
        db = np.where(ok, (h00 * g1 - h01 * g0) / safe, 0)
        a, b = a + da, b + db
        if max(np.abs(da).max(), np.abs(db).max()) < 1e-10:
            break
    return a, b


def bin_edges(scores: np.ndarray, bins: int = 10) -> np.ndarray:
    """Equal-count bin edges of the predicted risk (fixed across replicates)."""
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, bins + 1)))
    return edges[1:-1]


def calibration_bins(scores: np.ndarray, y: np.ndarray, w: np.ndarray,
                     edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: weight, mean predicted risk and IPCW observed risk (bins × columns)."""
    w = _as_2d(w)
    b = np.searchsorted(edges, scores, side="right")
    nb = edges.size + 1
    onehot = np.zeros((scores.size, nb))
    onehot[np.arange(scores.size), b] = 1.0
    weight = onehot.T @ w
    pred = onehot.T @ (w * scores[:, None])
    obs = onehot.T @ (w * np.nan_to_num(y)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return weight, pred / weight, obs / weight


def ece(scores: np.ndarray, y: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Expected calibration error: weighted mean |IPCW observed − predicted| over bins."""
    weight, pred, obs = calibration_bins(scores, y, w, edges)
    gap = np.nan_to_num(np.abs(obs - pred))
    return (weight * gap).sum(axis=0) / weight.sum(axis=0)


def net_benefit(scores: np.ndarray, y: np.ndarray, w: np.ndarray, threshold: float) -> np.ndarray:
    """Net benefit of treating when risk >= threshold (IPCW true/false positives)."""
    w = _as_2d(w)
    y = np.nan_to_num(y)[:, None]
    treat = (scores >= threshold)[:, None]
    tp = (w * y * treat).sum(axis=0)
    fp = (w * (1 - y) * treat).sum(axis=0)
    return (tp - fp * threshold / (1 - threshold)) / w.sum(axis=0)


def net_benefit_treat_all(y: np.ndarray, w: np.ndarray, threshold: float) -> np.ndarray:
    w = _as_2d(w)
    prev = (w * np.nan_to_num(y)[:, None]).sum(axis=0) / w.sum(axis=0)
    return prev - (1 - prev) * threshold / (1 - threshold)


class _Fenwick:
    """A binary indexed tree whose cells are vectors (one entry per weighting)."""

    def __init__(self, size: int, width: int):
        self.tree = np.zeros((size + 1, width))

    def add(self, i: int, v: np.ndarray) -> None:
        i += 1
        n = self.tree.shape[0]
        while i < n:
            self.tree[i] += v
            i += i & -i

    def prefix(self, i: int) -> np.ndarray:
        """Sum of cells [0, i)."""
        out = np.zeros(self.tree.shape[1])
        while i > 0:
            out += self.tree[i]
            i -= i & -i
        return out


def uno_c(scores: np.ndarray, time_days: np.ndarray, event_type: np.ndarray,
          horizon: float, g_left: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Uno's concordance truncated at ``horizon``, competing events not censoring.

    A pair (i, j) is comparable when i has the outcome at T_i <= horizon and j is still
    outcome-free after T_i: either T_j > T_i, or j had a competing event at or before
    T_i (it will never have the outcome).  Case i weighs m_i / G(T_i-)^2, comparator j
    weighs m_j; a pair is concordant when risk_i > risk_j (ties count one half).
    ``m`` holds one column per weighting.  O(n log n) per column via Fenwick trees.
    Rows without an event time (NaN: labels from a MEDS label file) take no part; with
    no row left, the result is NaN.
    """
    t = np.asarray(time_days, dtype=np.float64)
    timed = ~np.isnan(t)
    if not timed.all():
        m, t = _as_2d(m)[timed], t[timed]
        scores, event_type = np.asarray(scores)[timed], np.asarray(event_type)[timed]
        g_left = np.asarray(g_left)[timed]
    m = _as_2d(m)
    n, width = m.shape
    case = (event_type == OUTCOME) & (t <= horizon)
    comp = event_type == COMPETING
    rank = np.unique(scores, return_inverse=True)[1]
    size = int(rank.max()) + 1 if n else 1
    case_w = m / np.maximum(g_left, 1e-12)[:, None] ** 2
    num = np.zeros(width)
    den = np.zeros(width)
    # comparators with T_j > T_i: sweep times downwards, query before inserting ties
    later = _Fenwick(size, width)
    total = np.zeros(width)
    order = np.argsort(-t, kind="stable")
    ts = t[order]
    start = 0
    while start < n:
        end = start
        while end < n and ts[end] == ts[start]:
            end += 1
        for k in order[start:end]:
            if case[k]:
                below, upto = later.prefix(int(rank[k])), later.prefix(int(rank[k]) + 1)
                num += case_w[k] * (below + 0.5 * (upto - below))
                den += case_w[k] * total
        for k in order[start:end]:
            later.add(int(rank[k]), m[k])
            total += m[k]
        start = end
    # comparators with a competing event at or before T_i: sweep upwards, insert first
    early = _Fenwick(size, width)
    total = np.zeros(width)
    order = np.argsort(t, kind="stable")
    ts = t[order]
    start = 0
    while start < n:
        end = start
        while end < n and ts[end] == ts[start]:
            end += 1
        for k in order[start:end]:
            if comp[k]:
                early.add(int(rank[k]), m[k])
                total += m[k]
        for k in order[start:end]:
            if case[k]:
                below, upto = early.prefix(int(rank[k])), early.prefix(int(rank[k]) + 1)
                num += case_w[k] * (below + 0.5 * (upto - below))
                den += case_w[k] * total
        start = end
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)
