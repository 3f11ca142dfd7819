"""A survival-native candidate: a discrete-time hazard LightGBM with competing risks.

One multiclass model (0 neither, 1 the outcome, 2 the competing event) over
person-period rows: each prediction row becomes one row per period it was at risk in, its
features plus the period's start (days).  Periods split each stretch between the task's
horizons into equal bins of at most 90 days (365 and 730 days: ten bins of 73), so every
horizon is a period boundary.  A period (a, b] is one the row was at risk in if its
follow-up T > a (the first period always); it ends in the event when a < T ≤ b, is
survived when T > b, and **a row censored inside a period counts as at risk for half of
it** (class "neither", weight ½: the actuarial rule).  The cause-specific hazards
h₁(p), h₂(p) of each period give the outcome's cumulative incidence

    CIF(h) = Σ_{p ≤ h} S(p − 1) · h₁(p),   S(p) = Π_{q ≤ p} (1 − h₁(q) − h₂(q)),

which is each horizon's raw score: calibrated per horizon on the tuning split like every
family, then made non-decreasing across horizons again.  Early stopping uses the
early-stopping slice's person-period rows (multiclass log-loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import lightgbm as lgb
import numpy as np

from training.models import LGB_THREADS

BIN_MAX_DAYS = 90
EPS = 1e-6


def period_edges(horizons: list[int]) -> np.ndarray:
    """0, then each stretch between horizons in equal bins of at most 90 days."""
    edges = [0.0]
    for lo, hi in zip([0, *horizons[:-1]], horizons, strict=True):
        k = math.ceil((hi - lo) / BIN_MAX_DAYS)
        edges += [lo + (hi - lo) * (j + 1) / k for j in range(k)]
    return np.array(edges)


def person_period(x: np.ndarray, time_days: np.ndarray, event_type: np.ndarray,
                  edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features + period start, class, weight) of every (row, period at risk)."""
    a, b = edges[:-1], edges[1:]
    t = time_days[:, None]
    at_risk = (t > a[None, :]) | (np.arange(a.size) == 0)[None, :]
    ended = at_risk & (t <= b[None, :])
    event = event_type[:, None].astype(np.int64)
    cls = np.where(ended & (event > 0), event, 0)
    w = np.where(ended & (event == 0), 0.5, 1.0)
    rows, periods = np.nonzero(at_risk)
    xp = np.hstack([x[rows], a[periods, None].astype(np.float32)])
    return xp, cls[rows, periods], w[rows, periods]


def _grid(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Every row in every period: rows × periods stacked (row-major)."""
    n, p = x.shape[0], edges.size - 1
    return np.hstack([np.repeat(x, p, axis=0),
                      np.tile(edges[:-1].astype(np.float32), n)[:, None]])


@dataclass
class HazardModel:
    """The shared multiclass model; ``cif(x)``: rows × horizons."""

    params: dict[str, Any]
    horizons: list[int]
    seed: int = 0
    booster_: lgb.Booster | None = None
    best_iteration_: int = 0

    def fit(self, x, time_days, event_type, x_es, time_es, event_es) -> HazardModel:
        edges = period_edges(self.horizons)
        xp, yp, wp = person_period(x, time_days, event_type, edges)
        xe, ye, we = person_period(x_es, time_es, event_es, edges)
        for name, y in (("training", yp), ("early-stopping", ye)):
            if not (y == 1).any():
                raise ValueError(f"no outcome among the {name} person-period rows")
        params = {"objective": "multiclass", "num_class": 3, "verbose": -1,
                  "deterministic": True, "force_row_wise": True, "num_threads": LGB_THREADS,
                  "seed": self.seed, "bagging_seed": self.seed,
                  "feature_fraction_seed": self.seed, "data_random_seed": self.seed,
                  **self.params}
        train = lgb.Dataset(xp, yp, weight=wp, free_raw_data=True)
        valid = lgb.Dataset(xe, ye, weight=we, reference=train)
        booster = lgb.train(params, train, num_boost_round=2000, valid_sets=[valid],
                            callbacks=[lgb.early_stopping(50, verbose=False)])
        self.best_iteration_ = int(booster.best_iteration or booster.num_trees() // 3)
        self.booster_ = lgb.Booster(
            model_str=booster.model_to_string(num_iteration=self.best_iteration_))
        return self

    def hazards(self, x: np.ndarray) -> np.ndarray:
        """rows × periods × (neither, outcome, competing)."""
        edges = period_edges(self.horizons)
        p = self.booster_.predict(_grid(x, edges), num_threads=1)
        return p.reshape(x.shape[0], edges.size - 1, 3)

    def cif(self, x: np.ndarray) -> np.ndarray:
        h = self.hazards(x)
        surv = np.cumprod(1.0 - h[:, :, 1] - h[:, :, 2], axis=1)
        before = np.hstack([np.ones((x.shape[0], 1)), surv[:, :-1]])
        cum = np.cumsum(before * h[:, :, 1], axis=1)
        edges = period_edges(self.horizons)
        at = [int(np.searchsorted(edges, h_, side="left")) - 1 for h_ in self.horizons]
        return cum[:, at]


@dataclass
class HazardHorizon:
    """One horizon's view of the shared model: what the bundle's per-horizon code uses."""

    model: HazardModel
    index: int

    family: ClassVar[str] = "hazard"

    @property
    def best_iteration_(self) -> int:
        return self.model.best_iteration_

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.clip(self.model.cif(x)[:, self.index], EPS, 1 - EPS)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """TreeSHAP contributions to the outcome's raw (log-odds) score in the period
        that ends at this horizon; the period feature's own share dropped."""
        edges = period_edges(self.model.horizons)
        p = int(np.searchsorted(edges, self.model.horizons[self.index], side="left")) - 1
        rows = np.hstack([x, np.full((x.shape[0], 1), edges[p], dtype=np.float32)])
        c = self.model.booster_.predict(rows, pred_contrib=True, num_threads=1)
        width = x.shape[1] + 2  # features, the period, the bias
        return c[:, width:2 * width][:, : x.shape[1]]

    def fitted_params(self) -> dict[str, Any]:
        return {**self.model.params, "best_iteration": self.model.best_iteration_,
                "periods": int(period_edges(self.model.horizons).size - 1)}
