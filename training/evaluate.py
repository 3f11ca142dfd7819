"""Held-out evaluation per horizon, with subject-bootstrap intervals (DESIGN.md,
*Evaluation*).

Metrics: IPCW AUROC, AUPRC and Brier score, calibration-in-the-large and slope, ECE with
IPCW observed risk per bin, net benefit at clinical thresholds, and Uno's C truncated at
the horizon — each with a 95% percentile interval from resampling *subjects*, and each
twice: every row weighted equally, and every patient weighted equally (rows weighted
1 / their number of prediction times).  Subgroups below a minimum size say
"insufficient data".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.labels import label_column
from training import metrics as M
from training.censoring import CensoringSurvival, ipcw_weights

INSUFFICIENT = "insufficient data"
WEIGHTINGS = ("rows", "patients")


@dataclass(frozen=True)
class EvalFrame:
    """What evaluation needs of the held-out rows (no features, no clinical values)."""

    subject_id: np.ndarray
    time_days: np.ndarray
    event_type: np.ndarray
    labels: dict[int, np.ndarray]
    groups: dict[str, np.ndarray]  # subgroup name -> row mask

    @classmethod
    def from_training_rows(cls, rows: pd.DataFrame, horizons: list[int]) -> EvalFrame:
        groups: dict[str, np.ndarray] = {}
        if "GENDER//F__static" in rows:
            f = rows["GENDER//F__static"].to_numpy() == 1
            groups["sex: female"], groups["sex: male"] = f, ~f
        if "age_years" in rows:
            age = rows["age_years"].to_numpy()
            for lo, hi in ((0, 50), (50, 65), (65, 80), (80, 200)):
                name = f"age: {lo}-{hi - 1}" if hi < 200 else f"age: {lo}+"
                groups[name] = (age >= lo) & (age < hi)
        return cls(
            subject_id=rows["subject_id"].to_numpy(),
            time_days=rows["event_time_days"].to_numpy(dtype=np.float64),
            event_type=rows["event_type"].to_numpy(),
            labels={h: rows[label_column(h)].to_numpy(dtype=np.float64) for h in horizons},
            groups=groups,
        )

    def subset(self, mask: np.ndarray) -> EvalFrame:
        return EvalFrame(self.subject_id[mask], self.time_days[mask], self.event_type[mask],
                         {h: v[mask] for h, v in self.labels.items()},
                         {k: v[mask] for k, v in self.groups.items()})


def bootstrap_weights(subject_id: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Rows × (1 + n_boot): column 0 all ones, then how often each row's subject was drawn."""
    subjects, inverse = np.unique(subject_id, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(subjects.size, np.full(subjects.size, 1 / subjects.size),
                             size=n_boot).T.astype(np.float64)
    return np.hstack([np.ones((subject_id.size, 1)), counts[inverse]])


def patient_weights(subject_id: np.ndarray) -> np.ndarray:
    """1 / (the subject's number of prediction times)."""
    _, inverse, counts = np.unique(subject_id, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def _interval(values: np.ndarray) -> dict[str, float]:
    est = float(values[0])
    reps = values[1:][np.isfinite(values[1:])]
    if reps.size < 2 or not np.isfinite(est):
        return {"estimate": est, "lower": float("nan"), "upper": float("nan")}
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return {"estimate": est, "lower": float(lo), "upper": float(hi)}


SUBGROUP_METRICS = ("auroc", "brier", "citl", "ece")


def metric_columns(risk: np.ndarray, data: EvalFrame, horizon: int, m: np.ndarray,
                   g: CensoringSurvival, edges: np.ndarray | None = None,
                   with_uno: bool = True, only: tuple[str, ...] | None = None
                   ) -> dict[str, np.ndarray]:
    """Every metric (or ``only`` these) at one horizon, one value per column of ``m``."""
    y = data.labels[horizon]
    w_ipcw = ipcw_weights(data.time_days, y, horizon, g)
    w = m * w_ipcw[:, None]
    edges = M.bin_edges(risk) if edges is None else edges
    want = (lambda k: True) if only is None else (lambda k: k in only)
    out = {}
    if want("auroc"):
        out["auroc"] = M.auroc(risk, y, w)
    if want("auprc"):
        out["auprc"] = M.auprc(risk, y, w)
    if want("brier"):
        out["brier"] = M.brier(risk, y, w, m)
    if want("citl"):
        out["citl"] = M.calibration_in_the_large(risk, y, w)
    if want("calibration_slope"):
        out["calibration_slope"] = M.recalibration(risk, y, w)[1]
    if want("ece"):
        out["ece"] = M.ece(risk, y, w, edges)
    for t in M.CLINICAL_THRESHOLDS:
        if want(f"net_benefit_{int(t * 100)}"):
            out[f"net_benefit_{int(t * 100)}"] = M.net_benefit(risk, y, w, t)
    if with_uno and want("uno_c"):
        g_left = np.maximum(g(data.time_days, left=True), 0.05)
        out["uno_c"] = M.uno_c(risk, data.time_days, data.event_type, horizon, g_left, m)
    return out


def evaluate(risks: np.ndarray, data: EvalFrame, horizons: list[int], *, n_boot: int = 200,
             seed: int = 0, min_subgroup: int = 100, min_subgroup_events: int = 10) -> dict:
    """The evaluation report of one candidate (final risks, rows × horizons)."""
    g = CensoringSurvival.fit(data.time_days, data.event_type)
    boot = bootstrap_weights(data.subject_id, n_boot, seed)
    pw = patient_weights(data.subject_id)
    report: dict = {"n_rows": int(data.subject_id.size),
                    "n_subjects": int(np.unique(data.subject_id).size),
                    "n_bootstrap": n_boot, "horizons": {}}
    for i, h in enumerate(horizons):
        risk = risks[:, i]
        y = data.labels[h]
        entry: dict = {
            "observed_rows": int((~np.isnan(y)).sum()),
            "positives": int(np.nansum(y == 1)),
            "censored_rows": int(np.isnan(y).sum()),
        }
        edges = M.bin_edges(risk)
        for weighting in WEIGHTINGS:
            m = boot if weighting == "rows" else boot * pw[:, None]
            cols = metric_columns(risk, data, h, m, g, edges)
            entry[weighting] = {k: _interval(v) for k, v in cols.items()}
        entry["treat_all_net_benefit"] = {
            str(t): float(M.net_benefit_treat_all(y, ipcw_weights(data.time_days, y, h, g), t)[0])
            for t in M.CLINICAL_THRESHOLDS}
        weight, pred, obs = M.calibration_bins(risk, y, ipcw_weights(data.time_days, y, h, g),
                                               edges)
        entry["calibration_bins"] = {"predicted": pred[:, 0].tolist(),
                                     "observed": obs[:, 0].tolist(),
                                     "weight": weight[:, 0].tolist()}
        entry["subgroups"] = {}
        for name, mask in data.groups.items():
            sub = data.subset(mask)
            ys = sub.labels[h]
            n_obs, n_pos = int((~np.isnan(ys)).sum()), int(np.nansum(ys == 1))
            if n_obs < min_subgroup or n_pos < min_subgroup_events:
                entry["subgroups"][name] = {"n": n_obs, "positives": n_pos,
                                            "result": INSUFFICIENT}
                continue
            cols = metric_columns(risk[mask], sub, h, boot[mask], g, edges, with_uno=False,
                                  only=SUBGROUP_METRICS)
            entry["subgroups"][name] = {
                "n": n_obs, "positives": n_pos,
                **{k: _interval(cols[k]) for k in SUBGROUP_METRICS}}
        report["horizons"][str(h)] = entry
    return report


def paired_difference(risk_a: np.ndarray, risk_b: np.ndarray, data: EvalFrame, horizon: int,
                      metric: str, *, n_boot: int, seed: int) -> dict[str, float]:
    """metric(a) − metric(b) on the same rows and the same subject resamples."""
    g = CensoringSurvival.fit(data.time_days, data.event_type)
    boot = bootstrap_weights(data.subject_id, n_boot, seed)
    a = metric_columns(risk_a, data, horizon, boot, g, only=(metric,))[metric]
    b = metric_columns(risk_b, data, horizon, boot, g, only=(metric,))[metric]
    return _interval(a - b)


def flat_metrics(report: dict) -> dict[str, float]:
    """MLflow metric names: ``<metric>_<H>d`` (+ ``_lo``/``_hi``), ``_pw`` for patients."""
    out: dict[str, float] = {}
    for h, entry in report["horizons"].items():
        for weighting in WEIGHTINGS:
            suffix = "" if weighting == "rows" else "_pw"
            for name, ci in entry[weighting].items():
                base = f"{name}_{h}d{suffix}"
                out[base] = ci["estimate"]
                out[base + "_lo"] = ci["lower"]
                out[base + "_hi"] = ci["upper"]
    return {k: v for k, v in out.items() if np.isfinite(v)}
