"""A training job's report: one self-contained HTML file (plots embedded, no network).

Model card, all candidates side by side with their metrics and intervals, calibration
and decision curves, subgroup tables, the promotion decision and its reason, a data
summary and the feature list.  Everything comes from the MLflow runs, so a report can be
written for any past job.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from features.describe import describe_feature
from training.evaluate import INSUFFICIENT
from training.tracking import Tracker

METRICS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("brier", "Brier"),
           ("citl", "calibration-in-the-large"), ("calibration_slope", "calibration slope"),
           ("ece", "ECE"), ("uno_c", "Uno's C"), ("net_benefit_10", "net benefit at 10%"),
           ("net_benefit_20", "net benefit at 20%"))
SECTIONS = ("Promotion decision", "Data", "Candidates", "Calibration and decision curves",
            "Subgroups", "Features", "Model card")

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:380px;margin:4px;border:1px solid #eee}pre{background:#f7f7f7;padding:1em;
white-space:pre-wrap;font-size:12px}.ok{color:#1a7f37}.no{color:#b3261e}h2{margin-top:1.6em}"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _ci(ci: dict | None) -> str:
    if not ci:
        return ""
    est, lo, hi = ci.get("estimate"), ci.get("lower"), ci.get("upper")
    if est is None or est != est:
        return "–"
    if lo is None or lo != lo:
        return f"{est:.3f}"
    return f"{est:.3f} <small>({lo:.3f}–{hi:.3f})</small>"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def collect(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """Everything the report shows, read from MLflow."""
    client = tracker.client
    parent = client.get_run(run_id)
    if parent.data.tags.get("twincast.kind") != "training-job":
        parent_id = parent.data.tags.get("mlflow.parentRunId")
        if parent_id:
            parent = client.get_run(parent_id)
    pid = parent.info.run_id

    def load_json(rid: str, path: str) -> Any:
        with open(client.download_artifacts(rid, path)) as fh:
            return json.load(fh)

    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{pid}'")
    candidates = []
    for ch in sorted(children, key=lambda r: r.data.tags.get("family", "")):
        rid = ch.info.run_id
        plots = {}
        for art in client.list_artifacts(rid, "plots"):
            data = Path(client.download_artifacts(rid, art.path)).read_bytes()
            plots[Path(art.path).stem] = base64.b64encode(data).decode()
        with open(client.download_artifacts(rid, "model_card.md")) as fh:
            card = fh.read()
        candidates.append({"family": ch.data.tags.get("family"), "run_id": rid,
                           "evaluation": load_json(rid, "evaluation.json"),
                           "card": card, "plots": plots, "params": dict(ch.data.params),
                           "gate": ch.data.tags.get("twincast.gate.reason")})
    return {"run_id": pid, "tags": dict(parent.data.tags), "params": dict(parent.data.params),
            "started": datetime.fromtimestamp(parent.info.start_time / 1000, UTC),
            "task": load_json(pid, "task.json"), "spec": load_json(pid, "feature_spec.json"),
            "summary": load_json(pid, "data_summary.json"), "candidates": candidates}


def render(info: dict[str, Any]) -> str:
    tags, task, spec, summary = info["tags"], info["task"], info["spec"], info["summary"]
    cands = info["candidates"]
    best = tags.get("best_candidate")
    decision = tags.get("gate_decision", "not run")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>twincast report "
             f"{_e(info['run_id'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Training report: twincast-{_e(task['name'])}</h1>",
             _table(["", ""], [["run", _e(info["run_id"])],
                               ["started", _e(f"{info['started']:%Y-%m-%d %H:%M} UTC")],
                               ["code version", _e(tags.get("code_version"))],
                               ["training-data digest", _e(tags.get("data_digest"))],
                               ["task digest", _e(tags.get("task_digest"))],
                               ["FeatureSpec digest", _e(tags.get("feature_spec_digest"))],
                               ["best candidate", _e(best)],
                               ["registered version", _e(tags.get("registered_version"))]])]
    cls = "ok" if decision == "promoted" else "no"
    parts.append(f"<h2>Promotion decision</h2><p class='{cls}'><b>{_e(decision)}</b>: "
                 f"{_e(tags.get('gate_reason', ''))}</p>")
    rows = [["prediction rows", f"{summary['rows']:,}"], ["subjects", f"{summary['subjects']:,}"]]
    rows += [[f"rows: {k}", f"{v:,}"] for k, v in summary["rows_by_split"].items()]
    for h in task["horizons_days"]:
        pos, cen = summary["positives"][str(h)], summary["censored"][str(h)]
        observed = summary["rows"] - cen
        rows.append([f"{h} days: positives / observed (prevalence)",
                     f"{pos:,} / {observed:,} ({pos / max(observed, 1):.1%})"])
        rows.append([f"{h} days: censored rows", f"{cen:,} ({cen / summary['rows']:.1%})"])
    followup = summary.get("median_followup_days")
    rows.append(["median follow-up after a prediction time",
                 f"{followup:.0f} days" if followup is not None and followup == followup
                 else "unknown (labels from a MEDS label file)"])
    parts.append("<h2>Data</h2>" + _table(["", ""], rows))
    parts.append("<h2>Candidates</h2><p>Held-out split, 95% subject-bootstrap intervals; "
                 "'patients' weights every patient equally.</p>")
    for h in task["horizons_days"]:
        for weighting in ("rows", "patients"):
            head = [f"{h} days ({weighting})"] + [c["family"] + (" (best)" if c["family"] == best
                                                                 else "") for c in cands]
            table = [[label] + [_ci(c["evaluation"]["horizons"][str(h)][weighting].get(key))
                                for c in cands] for key, label in METRICS]
            parts.append(_table(head, table))
    parts.append("<h2>Calibration and decision curves</h2>")
    for c in cands:
        imgs = "".join(f"<img alt='{_e(name)}' src='data:image/png;base64,{data}'>"
                       for name, data in sorted(c["plots"].items()))
        parts.append(f"<h3>{_e(c['family'])}</h3>{imgs}")
    parts.append("<h2>Subgroups</h2>")
    for c in cands:
        for h in task["horizons_days"]:
            sub = c["evaluation"]["horizons"][str(h)]["subgroups"]
            rows = []
            for name, s in sub.items():
                if s.get("result") == INSUFFICIENT:
                    rows.append([_e(name), f"{s['n']:,}", f"{s['positives']:,}", INSUFFICIENT,
                                 INSUFFICIENT, INSUFFICIENT])
                else:
                    rows.append([_e(name), f"{s['n']:,}", f"{s['positives']:,}",
                                 _ci(s["auroc"]), _ci(s["brier"]), _ci(s["ece"])])
            parts.append(_table([f"{c['family']}, {h} days", "n", "positives", "AUROC",
                                 "Brier", "ECE"], rows))
    units = {c["code"]: c.get("unit") for c in spec["codes"]}
    feats = [[_e(n), _e(describe_feature(n, units.get(n.split("__")[0]))),
              _e(units.get(n.split("__")[0]) or "")] for n in spec["feature_names"]]
    parts.append(f"<h2>Features</h2><p>{len(feats)} features, frozen from the training "
                 "split.</p>" + _table(["feature", "meaning", "unit"], feats))
    card = next((c["card"] for c in cands if c["family"] == best), cands[0]["card"] if cands
                else "")
    parts.append(f"<h2>Model card</h2><pre>{_e(card)}</pre></body></html>")
    return "\n".join(parts)


def write_report(tracker: Tracker, run_id: str, out: str | Path, *, log: bool = True) -> Path:
    """Write the report of a training job to ``out`` and log it to the job's run."""
    info = collect(tracker, run_id)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(info))
    if log:
        tracker.client.log_artifact(info["run_id"], str(out), "report")
    return out
