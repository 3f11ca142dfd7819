"""Monitoring a served model: does it still keep its promise?

Pure computation over arrays (``serving.monitoring`` reads the store and calls it):

* **Which forecasts count** (:func:`counted`): one per (model version, subject, as-of
  time), the first one created, and only if it was foresight — made within
  ``max_forecast_delay_days`` of its as-of time (a refresh's re-forecast of an old as-of
  time is not) and before anything after its as-of time was known.
* **Realised labels** come from :func:`features.labels.labels_at`, the training labels'
  own code, on the twin's history as the store holds it now.  A forecast has *matured*
  at horizon H once its as-of time + H has passed (the store's latest arrival is "now");
  realised metrics use matured forecasts only — an early outcome is known before its
  horizon, but counting it then would over-represent early events.  Censoring and
  competing events are handled exactly as in evaluation (IPCW, competing events never
  censored), with the evaluation's own metric code (:func:`training.evaluate.metric_columns`).
* **Expected performance** of every counted forecast, matured or not: the AUROC, AUPRC
  and Brier score the model's own probabilities imply if it is calibrated (each row is a
  positive with weight p and a negative with weight 1 − p: NannyML's "confidence-based
  performance estimation"; AUPRC as a ratio of expectations).  Calibration itself is
  what this estimate assumes, so it is never estimated; no alert fires on an estimate.
* **Drift**: per top feature, the population stability index (PSI) of the window's
  counted forecasts (their shares, as the reference's are of training rows; the sample
  size behind the noise level is the patients, since one patient's rows are not
  independent)
  against the reference stored with the model version at training time (decile bins of
  the training split, plus a bin for missing), a chi-square two-sample test on the same
  bins, and the change in missingness; the same for each horizon's predicted risk
  against the held-out risks.
* **Alerts** (:func:`decide_alerts`), Bonferroni-corrected over every test one run makes
  so that its family-wise false-alarm rate stays at ``alpha``:
  a realised metric worse than the version's held-out value by more than the task's
  margin (AUROC lower, Brier score or ECE higher, calibration either way) with
  confidence (a subject bootstrap of the window, the held-out interval's spread, a
  normal interval at the corrected level), judged only in windows
  with ``min_patients`` matured patients and ``min_events`` outcomes; a drift whose PSI
  is above ``psi_threshold`` *and* above the PSI that noise reaches at the corrected
  level for the two samples' sizes — PSI of pure noise is about (1/n1 + 1/n2) times a
  chi-square with (bins − 1) degrees of freedom.  The chi-square test's p-value and the
  missingness are reported as evidence; the alert is the PSI's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from features.labels import label_column
from features.task import Monitoring, Task
from training import metrics as M
from training.censoring import CensoringSurvival
from training.evaluate import EvalFrame, bootstrap_weights, metric_columns, patient_weights

US_PER_DAY = 86_400_000_000
REALISED_METRICS = ("auroc", "brier", "citl", "calibration_slope", "ece")
EXPECTED_METRICS = ("auroc", "auprc", "brier")
ESTIMATE_LABEL = "expected if calibration holds"
MIN_CELL = 10  # no published cell describes fewer patients
REFERENCE_BINS = 10
PSI_FLOOR = 1e-4  # proportions floored so an empty bin gives a finite PSI


def settings_of(task: Task) -> Monitoring:
    """The task's monitoring section (tasks pickled before it had one: the defaults)."""
    return getattr(task, "monitoring", None) or Monitoring()


# ---------------------------------------------------------------------- reference
def reference_profile(x: np.ndarray, subject_id: np.ndarray, names: list[str],
                      importance: np.ndarray, heldout_risk: np.ndarray,
                      heldout_subject: np.ndarray, horizons: list[int], *, top: int,
                      seed: int = 0) -> dict[str, Any]:
    """What drift is measured against, stored with the model version: per feature (the
    ``top`` most important first, then the rest), decile edges of the training split's
    rows and each bin's share of them, missing included; the same for each horizon's
    held-out risk.  Shares are of rows — a window's patients, one forecast each, are
    visits of the population as the training rows are — and the sample size that the
    noise level uses is the number of patients (rows of one patient are not
    independent), which errs on the side of fewer alarms.  No bin holds fewer than 10
    rows (neighbours are merged; a missing share under 10 rows is stored as 10 rows),
    and edges are rounded to 4 significant digits: quantiles, not patients' rows."""
    order = np.argsort(-np.asarray(importance, dtype=np.float64), kind="stable")
    n_subjects = int(np.unique(subject_id).size)
    features = {names[j]: _profile(x[:, j], n_subjects) for j in order}
    n_risk = int(np.unique(heldout_subject).size)
    risks = {str(h): _profile(heldout_risk[:, i], n_risk) for i, h in enumerate(horizons)}
    return {"version": 2, "n_patients": n_subjects, "bins": REFERENCE_BINS,
            "top_features": [names[j] for j in order[:top]], "features": features,
            "risks": risks, "n_risk_patients": n_risk}


def _profile(values: np.ndarray, n_patients: int) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    present = v[~np.isnan(v)]
    bins = min(REFERENCE_BINS, present.size // MIN_CELL)
    edges = np.empty(0)
    if bins >= 2:
        q = np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1])
        edges = np.unique(np.array([float(f"{e:.4g}") for e in q]))
        # ties can leave a bin nearly empty: merge it into a neighbour
        counts = _bin_counts(present, edges)[:-1]
        while edges.size and counts.min() < MIN_CELL:
            k = int(np.argmin(counts))
            edges = np.delete(edges, min(k, edges.size - 1))
            counts = _bin_counts(present, edges)[:-1]
    counts = _bin_counts(v, edges)
    if 0 < counts[-1] < MIN_CELL:
        counts[-1] = MIN_CELL  # "fewer than 10": stored as 10
    total = max(float(counts.sum()), 1.0)
    return {"edges": edges.tolist(), "shares": (counts / total).tolist(),
            "missing": float(counts[-1] / total), "rows": int(total), "n": int(n_patients)}


def _bin_counts(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: (−inf, e1], (e1, e2], …, (ek, inf), then missing."""
    missing = np.isnan(v)
    idx = np.searchsorted(edges, v[~missing], side="left")
    counts = np.bincount(idx, minlength=edges.size + 1).astype(np.float64)
    return np.append(counts, float(missing.sum()))


# ---------------------------------------------------------------------- selection
def counted(version: np.ndarray, subject_id: np.ndarray, as_of_us: np.ndarray,
            created_us: np.ndarray, known_after_us: np.ndarray, max_delay_days: float
            ) -> np.ndarray:
    """Which forecasts count: the first created per (version, subject, as-of time), made
    within ``max_delay_days`` of its as-of time, and before anything dated after its
    as-of time had arrived (``known_after_us``: the earliest arrival of such an event,
    int64 max when none)."""
    n = subject_id.size
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    codes = np.unique(version, return_inverse=True)[1]
    order = np.lexsort((created_us, as_of_us, subject_id, codes))
    c, s, a = codes[order], subject_id[order], as_of_us[order]
    first = np.r_[True, (c[1:] != c[:-1]) | (s[1:] != s[:-1]) | (a[1:] != a[:-1])]
    keep[order[first]] = True
    delay = created_us - as_of_us
    keep &= (delay >= 0) & (delay <= max_delay_days * US_PER_DAY)
    keep &= created_us < known_after_us
    return keep


# ---------------------------------------------------------------------- metrics
def expected_columns(risk: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    """Expected AUROC, AUPRC and Brier score if the risks are calibrated, per column of
    the weight matrix ``m``: every row a positive with weight w·p and a negative with
    weight w·(1 − p)."""
    m = np.asarray(m, dtype=np.float64)
    p = np.asarray(risk, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        brier = (m * (p * (1 - p))[:, None]).sum(axis=0) / m.sum(axis=0)
    return {"auroc": M.auroc(p, p, m), "auprc": M.auprc(p, p, m), "brier": brier}


def interval(values: np.ndarray) -> dict[str, float]:
    """Estimate (column 0) and the 95% percentile interval of the bootstrap columns."""
    est = float(values[0])
    reps = values[1:][np.isfinite(values[1:])]
    if reps.size < 2 or not np.isfinite(est):
        return {"estimate": est, "lower": float("nan"), "upper": float("nan"),
                "se": float("nan")}
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return {"estimate": est, "lower": float(lo), "upper": float(hi),
            "se": float(reps.std(ddof=1))}


@dataclass
class HorizonWindow:
    """One (version, window, horizon): what was realised and what was expected."""

    horizon: int
    forecasts: int
    patients: int
    matured_forecasts: int
    matured_patients: int
    events: int
    # every forecast weighs the same (as held-out "rows"; what alerts judge) …
    realised: dict[str, dict[str, float]] = field(default_factory=dict)
    expected: dict[str, dict[str, float]] = field(default_factory=dict)
    expected_on_matured: dict[str, dict[str, float]] = field(default_factory=dict)
    # … and every patient weighs the same (1 / their forecasts in the window)
    realised_patients: dict[str, dict[str, float]] = field(default_factory=dict)
    expected_patients: dict[str, dict[str, float]] = field(default_factory=dict)
    # calibration now: per decile of risk, mean predicted and IPCW observed (bins of at
    # least 10 forecasts; fewer are merged into their neighbour)
    calibration: dict[str, list[float]] = field(default_factory=dict)


def horizon_window(risk: np.ndarray, subject_id: np.ndarray, labels, matured: np.ndarray,
                   horizon: int, *, n_boot: int, seed: int,
                   boot: np.ndarray | None = None) -> HorizonWindow:
    """Realised metrics (subject bootstrap) on the matured forecasts, the expected ones
    on all of them and on the matured ones (to compare), every forecast weighing the
    same; and the patient-weighted values (estimates).  ``boot``: the window's subject
    bootstrap (:func:`training.evaluate.bootstrap_weights`), shared by its horizons — the
    matured rows' replicates are the same draws restricted to them."""
    boot = bootstrap_weights(subject_id, n_boot, seed) if boot is None else boot
    pw = patient_weights(subject_id)
    y = labels[label_column(horizon)].to_numpy(np.float64)
    out = HorizonWindow(horizon, int(subject_id.size), int(np.unique(subject_id).size),
                        int(matured.sum()), int(np.unique(subject_id[matured]).size),
                        int(np.nansum(y[matured] == 1)))
    if subject_id.size:
        out.expected = {k: interval(v) for k, v in expected_columns(risk, boot).items()}
        out.expected_patients = {k: interval(v) for k, v in
                                 expected_columns(risk, pw[:, None]).items()}
    if out.matured_forecasts:
        sub = np.flatnonzero(matured)
        frame = EvalFrame(subject_id[sub],
                          labels["event_time_days"].to_numpy(np.float64)[sub],
                          labels["event_type"].to_numpy()[sub], {horizon: y[sub]}, {})
        mb = boot[sub]
        g = CensoringSurvival.fit(frame.time_days, frame.event_type)
        cols = metric_columns(risk[sub], frame, horizon, mb, g, with_uno=False,
                              only=REALISED_METRICS)
        out.realised = {k: interval(cols[k]) for k in REALISED_METRICS}
        mpw = patient_weights(frame.subject_id)[:, None]
        cols = metric_columns(risk[sub], frame, horizon, mpw, g, with_uno=False,
                              only=REALISED_METRICS)
        out.realised_patients = {k: interval(cols[k]) for k in REALISED_METRICS}
        out.expected_on_matured = {k: interval(v) for k, v in
                                   expected_columns(risk[sub], mb).items()}
        out.calibration = calibration_now(risk[sub], frame, horizon, g)
    return out


def calibration_now(risk: np.ndarray, frame: EvalFrame, horizon: int,
                    g: CensoringSurvival) -> dict[str, list[float]]:
    """Mean predicted and IPCW observed risk per decile bin of the matured forecasts
    (as the evaluation's calibration bins), no bin of fewer than 10 forecasts."""
    from training.censoring import ipcw_weights

    if risk.size < 2 * MIN_CELL:
        return {}
    edges = M.bin_edges(risk)
    while True:
        idx = np.searchsorted(edges, risk, side="right")
        counts = np.bincount(idx, minlength=edges.size + 1)
        small = np.flatnonzero((counts > 0) & (counts < MIN_CELL))
        if not small.size or edges.size == 0:
            break
        edges = np.delete(edges, min(int(small[0]), edges.size - 1))
    y = frame.labels[horizon]
    weight, pred, obs = M.calibration_bins(risk, y, ipcw_weights(frame.time_days, y,
                                                                 horizon, g), edges)
    keep = weight[:, 0] > 0
    return {"predicted": pred[keep, 0].tolist(), "observed": obs[keep, 0].tolist()}


# ---------------------------------------------------------------------- drift
def drift(values: np.ndarray, profile: dict[str, Any], n_patients: int | None = None
          ) -> dict[str, float]:
    """PSI, chi-square two-sample p-value and missingness of ``values`` (forecasts of
    ``n_patients`` patients, default one each) against a reference profile's bins; the
    samples' sizes are their patients (rows of one patient are not independent)."""
    v = np.asarray(values, dtype=np.float64)
    edges = np.asarray(profile["edges"], dtype=np.float64)
    cur = _bin_counts(v, edges)
    n_ref = int(profile["n"])
    n_cur = int(v.size if n_patients is None else n_patients)
    ref_share = np.asarray(profile["shares"], dtype=np.float64)
    cur_share = cur / max(v.size, 1)
    p, q = np.maximum(cur_share, PSI_FLOOR), np.maximum(ref_share, PSI_FLOOR)
    psi = float(((p - q) * np.log(p / q)).sum())
    used = (ref_share > 0) | (cur > 0)
    table = np.vstack([ref_share[used] * n_ref, cur_share[used] * n_cur])
    if table.shape[1] > 1 and n_cur > 0:
        pval = stats.chi2_contingency(table, correction=False)[1]
    else:
        pval = 1.0
    return {"psi": psi, "chi2_p": float(pval), "bins": int(used.sum()),
            "missing_reference": float(profile["missing"]),
            "missing_now": float(np.isnan(v).mean()) if v.size else float("nan"),
            "n_reference": n_ref, "n": n_cur}


def psi_noise(n1: int, n2: int, bins: int, level: float) -> float:
    """The PSI that pure sampling noise stays below with probability ``level``."""
    if n1 <= 0 or n2 <= 0 or bins < 2:
        return float("inf")
    return (1 / n1 + 1 / n2) * float(stats.chi2.ppf(level, bins - 1))


# ---------------------------------------------------------------------- alerts
@dataclass
class Test:
    """One judged comparison: an alert if it fails at the run's corrected level."""

    kind: str  # metric | drift
    version: str
    window: tuple[str, str]
    name: str  # the metric or feature ("risk_730d": prediction drift)
    horizon: int | None
    value: float
    reference: float
    evidence: dict[str, Any]


# which way a metric must move to be worse: +1 higher is worse, -1 lower, 0 either way
WORSE = {"auroc": -1, "brier": 1, "ece": 1, "citl": 0, "calibration_slope": 0}


def can_fire(t: Test) -> bool:
    """A metric test without a standard error on either side cannot alert (nor count)."""
    return t.kind != "metric" or bool(
        np.isfinite(t.evidence["se_realised"]) and np.isfinite(t.evidence["se_reference"]))


def decide_alerts(tests: list[Test], settings: Monitoring) -> list[dict[str, Any]]:
    """The tests that alert, with their evidence, Bonferroni-corrected over the tests
    that can alert.  A metric alerts when it is worse than held-out by more than the
    margin (AUROC lower; Brier score and ECE higher; calibration-in-the-large and slope
    either way), with confidence; a drift when its PSI is above the threshold and above
    the PSI of pure noise at the corrected level (its chi-square p-value is evidence)."""
    tests = [t for t in tests if can_fire(t)]
    m = max(len(tests), 1)
    level = 1 - settings.alpha / m
    z = float(stats.norm.ppf(1 - settings.alpha / (2 * m)))
    out = []
    for t in tests:
        e = dict(t.evidence)
        if t.kind == "metric":
            margin = getattr(settings.margins, t.name)
            diff = t.value - t.reference
            se = float(np.hypot(e["se_realised"], e["se_reference"]))
            lo, hi = diff - z * se, diff + z * se
            worse = WORSE[t.name]
            fire = (lo > margin and worse >= 0) or (hi < -margin and worse <= 0)
            e.update({"difference": diff, "interval": [lo, hi], "margin": margin,
                      "confidence": level})
        else:
            noise = psi_noise(e["n_reference"], e["n"], e["bins"], level)
            fire = t.value > settings.psi_threshold and t.value > noise
            e.update({"psi_threshold": settings.psi_threshold, "psi_noise": noise,
                      "confidence": level})
        if fire:
            out.append({"kind": t.kind, "model_version": t.version,
                        "window_start": t.window[0], "window_end": t.window[1],
                        "name": t.name, "horizon_days": t.horizon, "value": t.value,
                        "reference": t.reference, "evidence": _finite(e)})
    return out


def _finite(d: Any) -> Any:
    """JSON-safe: non-finite numbers as None."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_finite(v) for v in d]
    if isinstance(d, float | np.floating):
        return float(d) if np.isfinite(d) else None
    if isinstance(d, np.integer):
        return int(d)
    return d


def heldout_value(metrics: dict[str, float], name: str, horizon: int
                  ) -> tuple[float, float] | None:
    """The version's held-out value of a metric (every row weighing the same, as the
    realised value it is compared with) and its standard error (from its 95% interval),
    as training logged them; None when absent."""
    base = f"{name}_{horizon}d"
    if base not in metrics:
        return None
    lo, hi = metrics.get(base + "_lo"), metrics.get(base + "_hi")
    se = (hi - lo) / (2 * 1.96) if lo is not None and hi is not None else float("nan")
    return float(metrics[base]), float(se)


# ---------------------------------------------------------------------- MLflow
def log_run(tracker, model_name: str, report: dict[str, Any], work_dir) -> str:
    """Log a monitoring run under the model's experiment: metrics over time (one step
    per window, timestamped at its start), the report and its alerts as JSON, and a plot
    per version and horizon.  Returns the run id."""
    from pathlib import Path

    import mlflow

    from training.tracking import code_version

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with tracker.active():
        run = mlflow.start_run(experiment_id=tracker.experiment_id(model_name),
                               run_name=f"monitor-{report['task']}")
        try:
            mlflow.set_tags({"twincast.kind": "monitoring", "task": report["task"],
                             "code_version": code_version(),
                             "monitoring.alerts": str(len(report["alerts"])),
                             "monitoring.tests": str(report["tests"]),
                             "monitoring.window_days": str(report["window_days"]),
                             "monitoring.since": str(report.get("since")),
                             "monitoring.until": str(report.get("until"))})
            mlflow.log_params({"alpha": report.get("alpha"), "versions":
                               ",".join(report["versions"]) or "none"})
            for v, vr in report["versions"].items():
                for step, w in enumerate(vr["windows"]):
                    ts = int(np.datetime64(w["start"], "ms").astype(np.int64))
                    mlflow.log_metrics(_window_metrics(v, w), step=step, timestamp=ts)
            mlflow.log_metric("alerts", len(report["alerts"]))
            mlflow.log_dict(report, "monitoring.json")
            mlflow.log_dict({"alerts": report["alerts"]}, "alerts.json")
            for path in plot_over_time(report, work_dir):
                mlflow.log_artifact(str(path), "plots")
        finally:
            mlflow.end_run()
    return run.info.run_id


def _window_metrics(v: str, w: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for h, hw in w["horizons"].items():
        for kind in ("realised", "expected"):
            part = hw.get(kind)
            if not isinstance(part, dict):
                continue
            for m, ci in part.items():
                if ci.get("estimate") is not None:
                    out[f"v{v}.{kind}_{m}_{h}d"] = ci["estimate"]
        if isinstance(hw.get("matured_patients"), int) and hw["matured_patients"] >= MIN_CELL:
            out[f"v{v}.matured_patients_{h}d"] = float(hw["matured_patients"])
    drift = w.get("drift", {})
    psis = [d["psi"] for d in drift.get("features", {}).values() if d.get("psi") is not None]
    if psis:
        out[f"v{v}.max_feature_psi"] = max(psis)
    for h, d in drift.get("risks", {}).items():
        if d.get("psi") is not None:
            out[f"v{v}.risk_psi_{h}d"] = d["psi"]
    return out


def plot_over_time(report: dict[str, Any], out_dir) -> list:
    """Per version and horizon: realised AUROC and calibration-in-the-large per window
    with their intervals, the expected AUROC, and the held-out values (PNG; aggregates
    of at least 10 patients only)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for v, vr in report["versions"].items():
        for h, held in vr["heldout"].items():
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            for ax, m in zip(axes, ("auroc", "citl"), strict=True):
                xs, est, lo, hi, exp = [], [], [], [], []
                for w in vr["windows"]:
                    hw = w["horizons"].get(h, {})
                    r = hw.get("realised")
                    xs.append(np.datetime64(w["start"], "D"))
                    ok = isinstance(r, dict) and r.get(m, {}).get("estimate") is not None
                    est.append(r[m]["estimate"] if ok else np.nan)
                    lo.append(r[m]["lower"] if ok and r[m]["lower"] is not None else np.nan)
                    hi.append(r[m]["upper"] if ok and r[m]["upper"] is not None else np.nan)
                    e = hw.get("expected")
                    exp.append(e[m]["estimate"] if isinstance(e, dict) and m in e else np.nan)
                if not xs:
                    continue
                ax.fill_between(xs, lo, hi, alpha=0.25, label="realised, 95% interval")
                ax.plot(xs, est, marker="o", label="realised (matured)")
                if m == "auroc":
                    ax.plot(xs, exp, linestyle="--", label=ESTIMATE_LABEL)
                ref = (held or {}).get(m) if isinstance(held, dict) else None
                if ref and ref.get("estimate") is not None:
                    ax.axhline(ref["estimate"], color="grey", linestyle=":",
                               label="held-out")
                ax.set_title(f"{m} at {h} d, version {v}")
                ax.tick_params(axis="x", rotation=30)
                ax.legend(fontsize=7)
            path = Path(out_dir) / f"monitoring_v{v}_{h}d.png"
            fig.tight_layout()
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths
