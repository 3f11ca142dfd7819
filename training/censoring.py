"""Censoring: Kaplan-Meier of the censoring distribution and IPCW weights.

Time is measured from the prediction time *t*, so the Kaplan-Meier estimate over
prediction rows is the censoring survival *conditional on being under observation at t*,
G(t+s)/G(t).  Competing events are never censoring: a row whose competing event comes
first is observed (a negative), weighted like an outcome at that time.  With no censored
rows (labels from a MEDS label file) G = 1 everywhere and every observed row weighs 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.labels import CENSORED


@dataclass(frozen=True)
class CensoringSurvival:
    """Step function G(s) = P(still uncensored after s days)."""

    times: np.ndarray  # distinct censoring times, ascending (empty: nothing censored)
    surv: np.ndarray  # G just after each time

    @classmethod
    def fit(cls, time_days: np.ndarray, event_type: np.ndarray,
            weights: np.ndarray | None = None) -> CensoringSurvival:
        """Kaplan-Meier with censoring as the 'event'; outcomes at a tied time go first."""
        t = np.asarray(time_days, dtype=np.float64)
        w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64)
        cens = np.asarray(event_type) == CENSORED
        uniq, inv = np.unique(t, return_inverse=True)
        at_time = np.bincount(inv, weights=w, minlength=uniq.size)
        cens_at = np.bincount(inv, weights=w * cens, minlength=uniq.size)
        at_risk = at_time[::-1].cumsum()[::-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(at_risk > 0, 1.0 - cens_at / at_risk, 1.0)
        keep = cens_at > 0
        return cls(uniq[keep], np.cumprod(factor)[keep])

    def __call__(self, s: np.ndarray, *, left: bool = False) -> np.ndarray:
        """G(s), or G(s-) (just before s) with ``left``; 1 before the first censoring
        time, and everywhere when nothing is censored (labels from a MEDS label file)."""
        side = "left" if left else "right"
        idx = np.searchsorted(self.times, np.asarray(s, dtype=np.float64), side=side)
        # index a step table that starts at G = 1: no branch reads past an empty ``surv``
        return np.concatenate(([1.0], np.asarray(self.surv, dtype=np.float64)))[idx]


def ipcw_weights(time_days: np.ndarray, label: np.ndarray, horizon: float,
                 g: CensoringSurvival, floor: float = 0.05) -> np.ndarray:
    """Inverse-probability-of-censoring weights at one horizon (0 for censored rows).

    An observed row (label 0 or 1) weighs 1/G(min(T, H)-): rows that ended by an outcome
    or competing event before H by their own time, rows followed past H by G(H).  A row
    whose time is unknown (NaN: a label from a MEDS label file) counts as followed to H.
    G is floored so a few late rows cannot dominate.
    """
    observed = ~np.isnan(label)
    at = np.fmin(np.asarray(time_days, dtype=np.float64), horizon)
    g_at = np.maximum(g(at, left=True), floor)
    return np.where(observed, 1.0 / g_at, 0.0)
