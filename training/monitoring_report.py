"""The monitoring report: one self-contained HTML page (plots embedded, no network).

Read from a monitoring run in MLflow (``twincast monitor`` logs it): per model version,
the realised metrics over time with their intervals beside the held-out values and the
metrics expected if calibration holds; calibration then (the version's held-out bins)
and now (each window's matured forecasts); drift per feature; the alerts; and, when an
alert fired, the data window a retraining should use — ``twincast train`` on it and the
existing gate decide the rest.  Every number is an aggregate of at least 10 patients.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from training.report import CSS, _ci, _e, _table
from training.tracking import Tracker

MONITORING_KIND = "monitoring"
METRICS = (("auroc", "AUROC"), ("brier", "Brier"), ("citl", "calibration-in-the-large"),
           ("calibration_slope", "calibration slope"), ("ece", "ECE"))


def latest_run(tracker: Tracker, model_name: str) -> str | None:
    """The newest monitoring run of a model's experiment."""
    exp = tracker.client.get_experiment_by_name(model_name)
    if exp is None:
        return None
    runs = tracker.client.search_runs(
        [exp.experiment_id], f"tags.`twincast.kind` = '{MONITORING_KIND}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def collect(tracker: Tracker, run_id: str, heldout_calibration) -> dict[str, Any]:
    """The run's report and plots; ``heldout_calibration(version)`` gives a version's
    held-out calibration bins per horizon (from its evaluation), or None."""
    import mlflow

    with tracker.active():
        report = mlflow.artifacts.load_dict(f"runs:/{run_id}/monitoring.json")
        plots = {}
        for art in tracker.client.list_artifacts(run_id, "plots"):
            path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{art.path}")
            plots[Path(art.path).stem] = base64.b64encode(Path(path).read_bytes()).decode()
    then = {v: heldout_calibration(v) for v in report["versions"]}
    return {"run_id": run_id, "report": report, "plots": plots, "then": then}


def retraining_window(report: dict[str, Any]) -> str | None:
    """What a retraining should learn from, when an alert fired."""
    alerts = report.get("alerts") or []
    if not alerts:
        return None
    start = min(a["window_start"] for a in alerts)[:10]
    names = sorted({a["name"] for a in alerts})
    return (f"The population changed from {start} on ({', '.join(names[:6])}"
            f"{' …' if len(names) > 6 else ''}).  Retrain on the twins' histories through "
            f"{str(report.get('now'))[:10]} with a temporal split (split.temporal) whose "
            f"held-out period starts after {start}, so that the challenger both learns from "
            f"and is judged on patients as they are now: `twincast train --events <MEDS> "
            f"--task <task.yaml>`; the gate then compares it with the champion on the same "
            f"held-out subjects.")


def render(info: dict[str, Any]) -> str:
    rep = info["report"]
    fc = rep.get("forecasts", {})
    parts = [f"<h1>Monitoring: {_e(rep['model'])}</h1>",
             f"<p>run {_e(info['run_id'])} · data as of {_e(rep.get('now'))} · "
             f"{_e(fc.get('counted', 0))} of {_e(fc.get('stored', 0))} stored forecasts "
             f"count ({_e(fc.get('rule', ''))}) · labels {_e(rep['labels'])} · "
             f"{_e(rep.get('tests', 0))} tests, family-wise false-alarm rate "
             f"{_e(rep.get('alpha'))}</p>"]
    parts.append("<h2>Alerts</h2>")
    if rep["alerts"]:
        parts.append(_table(
            ["version", "window", "kind", "what", "horizon", "value", "reference", "evidence"],
            [[_e(a["model_version"]), _e(f"{a['window_start'][:10]} to {a['window_end'][:10]}"),
              _e(a["kind"]), _e(a["name"]), _e(a["horizon_days"] or ""),
              f"{a['value']:.3f}", f"{a['reference']:.3f}",
              _e(json.dumps({k: v for k, v in a["evidence"].items()
                             if k in ("interval", "margin", "psi_noise", "chi2_p", "n")}))]
             for a in rep["alerts"]]))
        window = retraining_window(rep)
        parts.append(f"<h3>The data window a retraining should use</h3><p>{_e(window)}</p>")
    else:
        parts.append("<p class='ok'>No alert.</p>")
    for v, vr in rep["versions"].items():
        parts.append(f"<h2>Version {_e(v)}</h2><p>drift reference: {_e(vr['reference'])}</p>")
        for h, held in vr["heldout"].items():
            parts.append(f"<h3>{_e(h)}-day risk: realised on matured forecasts "
                         "(every forecast weighing the same), 95% subject-bootstrap intervals"
                         "</h3>")
            rows = [["held-out", "", "", *(_ci((held or {}).get(m)) for m, _ in METRICS), ""]]
            for w in vr["windows"]:
                hw = w["horizons"].get(h, {})
                r, e = hw.get("realised"), hw.get("expected")
                rows.append([_e(w["start"][:10]), _e(hw.get("matured_patients", "")),
                             _e(hw.get("events", "")),
                             *(_ci(r.get(m)) if isinstance(r, dict) else _e(r or "")
                               for m, _ in METRICS),
                             _ci(e.get("auroc")) if isinstance(e, dict) else ""])
            parts.append(_table(["window", "matured patients", "events",
                                 *(label for _, label in METRICS),
                                 f"AUROC {rep['estimate_label']}"], rows))
            then = (info["then"].get(v) or {}).get(h)
            cal = [["then (held-out)", _bins(then)]] if then else []
            for w in vr["windows"]:
                c = w["horizons"].get(h, {}).get("calibration")
                if isinstance(c, dict) and c:
                    cal.append([_e(w["start"][:10]), _bins(c)])
            if cal:
                parts.append("<p>Calibration, predicted → observed per decile of risk:</p>"
                             + _table(["", "bins"], cal))
            img = info["plots"].get(f"monitoring_v{v}_{h}d")
            if img:
                parts.append(f"<img alt='metrics over time, version {_e(v)}, {_e(h)} days' "
                             f"src='data:image/png;base64,{img}' style='max-width:900px'>")
        drift_rows = []
        for w in vr["windows"]:
            for name, d in (w.get("drift") or {}).get("features", {}).items():
                drift_rows.append([_e(w["start"][:10]), _e(name), f"{d['psi']:.3f}",
                                   f"{d['chi2_p']:.2g}", _e(d.get("missing_reference")),
                                   _e(d.get("missing_now")), _e(d["n"])])
        if drift_rows:
            parts.append("<h3>Drift per feature (PSI against the training reference)</h3>"
                         + _table(["window", "feature", "PSI", "chi-square p",
                                   "missing then", "missing now", "patients"], drift_rows))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Monitoring "
            f"{_e(rep['model'])}</title><style>{CSS}</style></head><body>{''.join(parts)}"
            "</body></html>")


def _bins(c: dict[str, list[float]]) -> str:
    return " · ".join(f"{p:.3f}→{o:.3f}" for p, o in zip(c["predicted"], c["observed"],
                                                        strict=True) if p == p and o == o)


def write(tracker: Tracker, run_id: str, out: str | Path, heldout_calibration) -> Path:
    out = Path(out)
    out.write_text(render(collect(tracker, run_id, heldout_calibration)), encoding="utf-8")
    return out
