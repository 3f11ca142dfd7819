"""The model card: what an auditor reads first (markdown)."""

from __future__ import annotations

from training.evaluate import INSUFFICIENT


def _ci(ci: dict) -> str:
    if ci["estimate"] != ci["estimate"]:  # NaN: e.g. Uno's C without event times
        return "n/a"
    if ci["lower"] != ci["lower"]:  # NaN
        return f"{ci['estimate']:.3f}"
    return f"{ci['estimate']:.3f} ({ci['lower']:.3f}–{ci['upper']:.3f})"


def _labels_line(task) -> str:
    if task.labels is None:
        return ("- labels: derived from the events by the task's rules (censored rows "
                "weigh 0, the others by inverse probability of censoring)")
    return (f"- labels: as given in the MEDS label file(s) `{task.labels.path.name}` (prediction "
            "times and labels used as is, nothing censored, every row weighs 1; Uno's C "
            "needs event times and is not reported)")


def model_card(*, task, family: str, params: dict, report: dict, data_summary: dict,
               data_digest: str, spec, code_version: str, decision: str | None = None) -> str:
    lines = [
        f"# Model card: twincast-{task.name} ({family})",
        "",
        "## Intended use",
        f"{task.description.strip() or task.name}",
        "",
        f"Risk of {', '.join(task.outcome.all_codes())} within "
        f"{', '.join(str(h) for h in task.horizons_days)} days of a prediction time, with "
        f"{', '.join(task.competing.all_codes()) or 'no'} competing events. For decision "
        "support by clinicians who also see the patient; not a diagnosis, and not a causal "
        "statement about any treatment.",
        "",
        "## Data",
        f"- training-data digest (SHA-256 of all events): `{data_digest}`",
        f"- prediction rows: {data_summary.get('rows', '?'):,} "
        f"({', '.join(f'{k} {v:,}' for k, v in data_summary.get('rows_by_split', {}).items())})",
        f"- subjects: {data_summary.get('subjects', '?'):,}",
        _labels_line(task),
        f"- features: {len(spec.feature_names)} (FeatureSpec `{spec.digest()[:12]}`)",
        f"- code version: `{code_version}`",
        "",
        "## Model",
        f"- family: {family}; parameters: `{params}`",
        "- one model per horizon, inverse-probability-of-censoring weighted (competing events "
        "are negatives, never censored); Platt calibration per horizon on the tuning split; "
        "risks made non-decreasing across horizons.",
        "",
        f"## Held-out performance ({report['n_subjects']:,} subjects, {report['n_rows']:,} "
        f"rows, {report['n_bootstrap']} subject-bootstrap resamples, 95% intervals)",
        "",
        "| horizon | weighting | AUROC | AUPRC | Brier | CITL | slope | ECE | Uno's C |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h, e in report["horizons"].items():
        for w in ("rows", "patients"):
            m = e[w]
            lines.append(f"| {h} d | {w} | {_ci(m['auroc'])} | {_ci(m['auprc'])} | "
                         f"{_ci(m['brier'])} | {_ci(m['citl'])} | {_ci(m['calibration_slope'])}"
                         f" | {_ci(m['ece'])} | {_ci(m['uno_c'])} |")
    lines += ["", "## Calibration", ""]
    for h, e in report["horizons"].items():
        m = e["rows"]
        lines.append(f"- {h} days: slope {_ci(m['calibration_slope'])}, calibration-in-the-"
                     f"large {_ci(m['citl'])}, ECE {_ci(m['ece'])}")
    lines += ["", "## Subgroups", "", "| horizon | subgroup | n | positives | AUROC | Brier |",
              "|---|---|---|---|---|---|"]
    for h, e in report["horizons"].items():
        for name, s in e["subgroups"].items():
            if s.get("result") == INSUFFICIENT:
                lines.append(f"| {h} d | {name} | {s['n']} | {s['positives']} | "
                             f"{INSUFFICIENT} | {INSUFFICIENT} |")
            else:
                lines.append(f"| {h} d | {name} | {s['n']} | {s['positives']} | "
                             f"{_ci(s['auroc'])} | {_ci(s['brier'])} |")
    lines += [
        "", "## Limitations",
        "- Trained on the data named above; performance elsewhere (other sites, periods, "
        "coding practices) is unknown until measured there.",
        "- Censoring is assumed independent of the outcome given time since prediction "
        "(marginal Kaplan-Meier IPCW).",
        "- Contributions explain the model, not the patient's biology; they are "
        "associational.",
    ]
    if decision:
        lines += ["", "## Promotion decision", "", decision]
    return "\n".join(lines) + "\n"
