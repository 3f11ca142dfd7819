"""Biomarker trajectories: conformalised quantile forecasts of a numeric code at t+H.

Per target (code, horizon) of the task (``features.targets`` says what the value is):

1. **Fit** one LightGBM quantile booster per quantile on the fit part of the training
   split, early stopping on its held-back slice — the same rows, features and
   point-in-time rules as the risk models.  A linear quantile regression on the code's
   last value and its age (``LinearQuantiles``) is fitted beside it as the baseline.
2. **Conformalise** each central interval on the tuning split (conformalised quantile
   regression, Romano et al. 2019): the score of a row is how far its value lies outside
   the interval, ``max(lo - y, y - hi)``; both ends move outward by the score's
   ⌈(n+1)·c⌉-th smallest value, c the interval's nominal coverage.  Coverage then holds
   for rows like the tuning rows (exchangeable with them) — not necessarily for every
   subgroup, as visits follow what was measured: the evaluation reports coverage by risk
   decile and subgroup too.
3. **Never crossing**: from the median outward each lower end is at most the one
   inside it and each upper end at least the one inside it, so an interval is never
   narrower than its calibrated width and quantiles never cross (how often the raw
   quantiles crossed is reported).

A target with too few rows in a part, or a baseline without the code's last value
among the features, is skipped with its reason (logged, and tagged on the run) rather
than failing the risk models' training.

The held-out evaluation (``evaluate_trajectories``): MAE of the median, and per interval
its coverage and mean width, each with a subject-bootstrap 95% interval.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from features.targets import target_column
from features.task import Task, TrajectoryTarget
from training.evaluate import _interval, bootstrap_weights
from training.models import LGB_THREADS
from training.treepredict import TreePredictor

QUANTILE_PARAMS = {"learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 40,
                   "feature_fraction": 0.8, "lambda_l2": 1.0}
MAX_ROUNDS = 1000
MIN_ROWS = 50  # per part and target: fewer and the target is skipped (with its reason)
MIN_SUBGROUP = 100  # rows with a value, for a subgroup's or decile's coverage
BASELINE_ROWS = 20_000  # the linear baseline's fit sample (a linear program per quantile)


class TrajectoryError(ValueError):
    """A trajectory target cannot be trained as asked."""


class TrajectorySkipped(TrajectoryError):
    """This target (or its baseline) is left out of the model, for the reason given."""


@dataclass
class QuantileBooster:
    """One quantile's LightGBM booster, predicted by the compiled tree walk."""

    booster_: lgb.Booster

    def predict(self, x: np.ndarray) -> np.ndarray:
        walk = self.walk()
        return walk.predict(x) if walk is not None else self.booster_.predict(x, num_threads=1)

    def walk(self) -> TreePredictor | None:
        if "_walk" not in self.__dict__:
            w = TreePredictor.from_booster(self.booster_)
            if w is not None:  # compiled (or loaded from its cache) now, not on a request
                w.predict(np.zeros((1, w.n_features), dtype=np.float32))
            self.__dict__["_walk"] = w
        return self.__dict__["_walk"]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_walk"}


@dataclass
class LinearQuantiles:
    """The baseline: a linear quantile regression per quantile on the code's last value
    and its age (missing last values take the training median, with an indicator)."""

    columns: list[int]
    quantiles: list[float]
    fill_: np.ndarray | None = None
    coefs_: np.ndarray | None = None  # quantiles × (1 + features)

    def _design(self, x: np.ndarray) -> np.ndarray:
        z = x[:, self.columns].astype(np.float64)
        miss = np.isnan(z)
        z = np.where(miss, self.fill_, z)
        return np.column_stack([np.ones(len(z)), z, miss[:, :1].astype(np.float64)])

    def fit(self, x: np.ndarray, y: np.ndarray, seed: int) -> LinearQuantiles:
        from sklearn.linear_model import QuantileRegressor

        if len(y) > BASELINE_ROWS:
            keep = np.random.default_rng(seed).choice(len(y), BASELINE_ROWS, replace=False)
            x, y = x[keep], y[keep]
        z = x[:, self.columns].astype(np.float64)
        med = np.nanmedian(z, axis=0)
        self.fill_ = np.where(np.isfinite(med), med, 0.0)
        d = self._design(x)
        coefs = []
        for q in self.quantiles:
            fit = QuantileRegressor(quantile=q, alpha=0.0, fit_intercept=False,
                                    solver="highs").fit(d, y)
            coefs.append(fit.coef_)
        self.coefs_ = np.asarray(coefs)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._design(x) @ self.coefs_.T


@dataclass
class TrajectoryModel:
    """A target's quantile models and conformal corrections (rows × quantiles out)."""

    code: str
    unit: str | None
    horizon_days: int
    tolerance_days: int
    quantiles: list[float]
    family: str  # lightgbm | linear
    models: list[Any]  # lightgbm: one QuantileBooster per quantile; linear: one
    corrections: dict[str, float] = field(default_factory=dict)  # "0.1-0.9" → outward shift
    n_calibration: int = 0

    def raw(self, x: np.ndarray) -> np.ndarray:
        if self.family == "linear":
            return self.models[0].predict(x)
        return np.column_stack([m.predict(x) for m in self.models])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Conformalised, sorted quantiles (rows × quantiles, in ``quantiles`` order)."""
        return conformalised(self.raw(x), self.quantiles, self.corrections)

    def prepare(self) -> None:
        """Compile the tree walks now (at load), not on the first request."""
        for m in self.models:
            if isinstance(m, QuantileBooster):
                m.walk()


def interval_key(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}"


def conformalised(raw: np.ndarray, quantiles: list[float],
                  corrections: dict[str, float]) -> np.ndarray:
    """Each interval moved by its correction, then made nested: from the median outward
    a lower end is at most the one inside it and an upper end at least the one inside
    it (an interval only ever widens past its calibrated width; nothing crosses)."""
    out = np.array(raw, dtype=np.float64, copy=True)
    index = {q: i for i, q in enumerate(quantiles)}
    for q in quantiles:
        if q < 0.5:
            hi = round(1 - q, 6)
            shift = corrections.get(interval_key(q, hi), 0.0)
            out[:, index[q]] -= shift
            out[:, index[hi]] += shift
    mid = index[0.5]  # quantiles are sorted: lower ends left of the median, upper right
    out[:, :mid + 1] = np.minimum.accumulate(out[:, mid::-1], axis=1)[:, ::-1]
    out[:, mid:] = np.maximum.accumulate(out[:, mid:], axis=1)
    return out


def conformal_shift(lo: np.ndarray, hi: np.ndarray, y: np.ndarray, coverage: float) -> float:
    """CQR's correction: the ⌈(n+1)·c⌉-th smallest conformity score (finite-sample valid
    for exchangeable rows)."""
    scores = np.sort(np.maximum(lo - y, y - hi))
    k = math.ceil((scores.size + 1) * coverage)
    if k > scores.size:
        raise TrajectoryError(f"{scores.size} calibration rows cannot give {coverage:.0%} "
                              "coverage: add tuning subjects")
    return float(scores[k - 1])


def _rows(part: pd.DataFrame, names: list[str], column: str) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    y = part[column].to_numpy(np.float64)
    keep = np.isfinite(y)
    return part[names].to_numpy(np.float32)[keep], y[keep], keep


def _baseline_columns(names: list[str], code: str) -> list[int]:
    """The code's last value and the days since it, over all history (else the widest
    window: feature names are ``CODE__window__aggregation``)."""
    cols = []
    for agg in ("last", "days_since_last"):
        hits = [i for i, n in enumerate(names)
                if n.startswith(f"{code}__") and n.endswith(f"__{agg}")]
        if not hits:
            raise TrajectorySkipped(f"trajectories: the linear baseline needs {code}'s "
                                    f"'{agg}' feature, which the task's features do not "
                                    "include")
        all_ = [i for i in hits if names[i] == f"{code}__all__{agg}"]
        cols.append(all_[0] if all_ else hits[-1])
    return cols


def fit_target(target: TrajectoryTarget, h: int, parts: dict[str, pd.DataFrame],
               names: list[str], unit: str | None, seed: int, family: str = "lightgbm"
               ) -> TrajectoryModel:
    column = target_column(target.code, h)
    x, y, _ = _rows(parts["fit"], names, column)
    x_es, y_es, _ = _rows(parts["early_stopping"], names, column)
    x_cal, y_cal, _ = _rows(parts["tuning"], names, column)  # the calibration rows
    for part, n in (("fit", y.size), ("early stopping", y_es.size), ("tuning", y_cal.size)):
        if n < MIN_ROWS:
            raise TrajectorySkipped(f"trajectories: {target.code} at {h} days has {n} rows with "
                                  f"a value in the {part} part (at least {MIN_ROWS} needed)")
    if family == "linear":
        models: list[Any] = [LinearQuantiles(_baseline_columns(names, target.code),
                                             list(target.quantiles)).fit(x, y, seed)]
    else:
        models = []
        for q in target.quantiles:
            params = {"objective": "quantile", "alpha": q, "verbose": -1,
                      "deterministic": True, "force_row_wise": True,
                      "num_threads": LGB_THREADS, "seed": seed, "bagging_seed": seed,
                      "feature_fraction_seed": seed, "data_random_seed": seed,
                      **QUANTILE_PARAMS}
            train = lgb.Dataset(x, y, free_raw_data=True)
            valid = lgb.Dataset(x_es, y_es, reference=train)
            b = lgb.train(params, train, num_boost_round=MAX_ROUNDS, valid_sets=[valid],
                          callbacks=[lgb.early_stopping(50, verbose=False)])
            best = int(b.best_iteration or b.num_trees())
            models.append(QuantileBooster(lgb.Booster(model_str=b.model_to_string(
                num_iteration=best))))
    model = TrajectoryModel(target.code, unit, h, target.tolerance_days,
                            list(target.quantiles), family, models)
    raw = model.raw(x_cal)
    index = {q: i for i, q in enumerate(model.quantiles)}
    for lo, hi in target.intervals:
        model.corrections[interval_key(lo, hi)] = conformal_shift(
            raw[:, index[lo]], raw[:, index[hi]], y_cal, hi - lo)
    model.n_calibration = int(y_cal.size)
    return model


def fit_trajectories(task: Task, parts: dict[str, pd.DataFrame], names: list[str],
                     units: dict[str, str | None], seed: int, family: str = "lightgbm",
                     skipped: list[str] | None = None) -> list[TrajectoryModel]:
    """The task's targets' models; a target that cannot be fitted is left out and its
    reason appended to ``skipped``."""
    out = []
    for t in getattr(task, "trajectories", []):
        for h in t.horizons_days:
            try:
                out.append(fit_target(t, h, parts, names, units.get(t.code), seed, family))
            except TrajectorySkipped as exc:
                if skipped is not None:
                    skipped.append(f"{family}: {exc}")
    return out


def _summaries(pred: np.ndarray, y: np.ndarray, quantiles: list[float], w: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Weighted metrics per bootstrap column (w: rows × replicates)."""
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"mae": (np.abs(pred[:, quantiles.index(0.5)] - y) @ w) / total}
        for q in quantiles:
            if q < 0.5:
                hi = round(1 - q, 6)
                lo_v, hi_v = pred[:, quantiles.index(q)], pred[:, quantiles.index(hi)]
                inside = ((y >= lo_v) & (y <= hi_v)).astype(np.float64)
                key = f"{round((hi - q) * 100):d}"
                out[f"coverage_{key}"] = (inside @ w) / total
                out[f"width_{key}"] = ((hi_v - lo_v) @ w) / total
    return out


def evaluate_target(model: TrajectoryModel, heldout: pd.DataFrame, x_held: np.ndarray,
                    risk: np.ndarray, risk_horizons: list[int], groups: dict[str, np.ndarray],
                    n_boot: int, seed: int) -> dict[str, Any]:
    """Held-out metrics with subject-bootstrap intervals, overall, by risk decile and by
    subgroup; ``risk`` is the served risk (rows × horizons) of the same rows."""
    y_all = heldout[target_column(model.code, model.horizon_days)].to_numpy(np.float64)
    keep = np.isfinite(y_all)
    y = y_all[keep]
    entry: dict[str, Any] = {"code": model.code, "unit": model.unit,
                             "horizon_days": model.horizon_days, "family": model.family,
                             "rows": int(keep.sum()), "rows_without_value": int((~keep).sum()),
                             "subjects": int(np.unique(heldout["subject_id"].to_numpy()[keep])
                                             .size), "n_calibration": model.n_calibration,
                             "corrections": dict(model.corrections)}
    if y.size == 0:
        entry["overall"] = {}
        return entry
    raw = model.raw(x_held[keep])
    pred = model.predict(x_held[keep])  # never crossing: made nested after the correction
    entry["raw_crossing_rows"] = int((np.diff(raw, axis=1) < 0).any(axis=1).sum())
    sid = heldout["subject_id"].to_numpy()[keep]
    w = bootstrap_weights(sid, n_boot, seed)
    entry["overall"] = {k: _interval(v) for k, v in
                        _summaries(pred, y, model.quantiles, w).items()}
    # by the decile of the risk at the nearest horizon at or after the trajectory's
    h_i = next((i for i, h in enumerate(risk_horizons) if h >= model.horizon_days),
               len(risk_horizons) - 1)
    r = risk[keep, h_i]
    edges = np.quantile(r, np.linspace(0, 1, 11)[1:-1])
    decile = np.searchsorted(edges, r, side="right")
    entry["by_risk_decile"] = {"risk_horizon_days": risk_horizons[h_i], "deciles": []}
    for d in range(10):
        m = decile == d
        entry["by_risk_decile"]["deciles"].append(_group(pred, y, model, m, w, d + 1))
    entry["by_subgroup"] = {name: _group(pred, y, model, mask[keep], w, name)
                            for name, mask in groups.items()}
    return entry


def _group(pred, y, model, m, w, name) -> dict[str, Any]:
    n = int(m.sum())
    if n < MIN_SUBGROUP:
        return {"group": name, "rows": n, "note": f"fewer than {MIN_SUBGROUP} rows"}
    s = _summaries(pred[m], y[m], model.quantiles, w[m])
    return {"group": name, "rows": n, **{k: _interval(v) for k, v in s.items()}}


def coverage_ok(report: list[dict[str, Any]], task: Task) -> tuple[bool, str]:
    """The gate's trajectory part: every interval's held-out coverage within the task's
    ``max_coverage_error`` of nominal — and some held-out rows to judge it on."""
    limits = {t.code: t.max_coverage_error for t in getattr(task, "trajectories", [])}
    problems = []
    for e in report:
        name = f"{e['code']} {e['horizon_days']}-day"
        if e.get("rows", 0) < MIN_ROWS:
            problems.append(f"{name} trajectory has {e.get('rows', 0)} held-out rows with a "
                            f"value: its coverage cannot be judged (at least {MIN_ROWS})")
            continue
        for k, v in e["overall"].items():
            if not k.startswith("coverage_"):
                continue
            nominal = int(k.split("_")[1]) / 100
            limit = limits.get(e["code"], 0.05)
            if abs(v["estimate"] - nominal) > limit:
                problems.append(f"{name} {k[9:]}% interval covers {v['estimate']:.3f} "
                                f"(limit ±{limit})")
    return (not problems, "; ".join(problems) or "trajectory coverage within limits")


def flat_trajectory_metrics(report: list[dict[str, Any]], prefix: str = "trajectory"
                            ) -> dict[str, float]:
    """MLflow metric names (``trajectory_LAB_EGFR_365d_coverage_80`` and its _lo/_hi)."""
    out = {}
    for e in report:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", e["code"]).strip("_")
        base = f"{prefix}_{slug}_{e['horizon_days']}d"
        for k, v in e.get("overall", {}).items():
            out[f"{base}_{k}"] = v["estimate"]
            if math.isfinite(v["lower"]):
                out[f"{base}_{k}_lo"], out[f"{base}_{k}_hi"] = v["lower"], v["upper"]
    return out
