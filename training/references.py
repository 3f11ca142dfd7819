"""Published reference scores, evaluated beside the trained candidates (never promoted).

A task names them (``references: [{name: kfre4}]``); training computes each on the
held-out rows where it is defined, from the same point-in-time features the models see,
and reports it with the same metrics and subject-bootstrap intervals — and the trained
model's own figures on exactly those rows, with the paired difference — so that on real
data the report says what the model adds over what clinicians already use.  Horizons
where a score is not defined are reported as "not defined", never extrapolated.

**KFRE, 4 variables** (kidney failure risk equation):

    risk(t) = 1 − S0(t) ^ exp(−0.2201·(age/10 − 7.036) + 0.2467·(male − 0.5642)
                              − 0.5567·(eGFR/5 − 7.222) + 0.4510·(ln UACR − 5.137))

with age in years, eGFR in ml/min/1.73m², UACR (urine albumin-to-creatinine ratio) in
mg/g.  Coefficients and centring: Tangri N, Stevens LA, Griffith J, et al.  A predictive
model for progression of chronic kidney disease to kidney failure.  JAMA 2011;305(15):
1553–1559.  Baseline survival S0 as recalibrated in Tangri N, Grams ME, Levey AS, et al.
Multinational assessment of accuracy of equations for predicting risk of kidney failure:
a meta-analysis.  JAMA 2016;315(2):164–174 — North America 0.9750 at 2 years and 0.9240
at 5 years; elsewhere 0.9832 and 0.9365.  Defined at 2 and 5 years only, for patients
with CKD G3–G5 (eGFR below 60, here at least 10) and a UACR: adults of recorded sex,
the eGFR measured within the year before the prediction time and the UACR within two
years.  UACR must be in mg/g: a task whose UACR is in another unit is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.task import ReferenceScore, Task
from training.evaluate import EvalFrame, evaluate, paired_difference

NOT_DEFINED = "not defined"
KFRE_BASELINE = {"north_america": {730: 0.9750, 1825: 0.9240},
                 "other": {730: 0.9832, 1825: 0.9365}}
KFRE_INPUTS = ("age_years", "GENDER//M__static", "GENDER//F__static", "LAB//EGFR__all__last",
               "LAB//EGFR__all__days_since_last", "LAB//UACR__all__last",
               "LAB//UACR__all__days_since_last")


@dataclass(frozen=True)
class ReferenceRisk:
    risk: np.ndarray  # rows; NaN where not defined
    defined: np.ndarray  # rows: bool
    why: str  # when nothing is defined: why


def kfre4(rows: pd.DataFrame, horizon_days: int, region: str = "north_america"
          ) -> ReferenceRisk:
    """The 4-variable KFRE's risk of kidney failure within ``horizon_days`` for each row
    (features at the prediction time), NaN where it is not defined."""
    n = len(rows)
    s0 = KFRE_BASELINE[region].get(horizon_days)
    if s0 is None:
        return ReferenceRisk(np.full(n, np.nan), np.zeros(n, bool),
                             f"the KFRE is defined at 2 and 5 years, not {horizon_days} days")
    # both sex codes are needed: with one, a patient without it could be the other sex
    # or of unrecorded sex
    missing = [c for c in KFRE_INPUTS if c not in rows]
    if missing:
        return ReferenceRisk(np.full(n, np.nan), np.zeros(n, bool),
                             f"the task's features lack {', '.join(missing)}")

    def col(name: str) -> np.ndarray:
        return rows[name].to_numpy(np.float64)

    age, egfr, uacr = col("age_years"), col("LAB//EGFR__all__last"), col("LAB//UACR__all__last")
    male, female = col("GENDER//M__static") == 1, col("GENDER//F__static") == 1
    sex_seen = male ^ female
    with np.errstate(invalid="ignore"):
        defined = (np.isfinite(age) & (age >= 18) & sex_seen & (egfr >= 10) & (egfr < 60)
                   & (col("LAB//EGFR__all__days_since_last") <= 365)
                   & (uacr > 0) & (col("LAB//UACR__all__days_since_last") <= 730))
    with np.errstate(invalid="ignore", divide="ignore"):
        lp = (-0.2201 * (age / 10 - 7.036) + 0.2467 * (male - 0.5642)
              - 0.5567 * (egfr / 5 - 7.222) + 0.4510 * (np.log(uacr) - 5.137))
        risk = 1 - s0 ** np.exp(lp)
    return ReferenceRisk(np.where(defined, risk, np.nan), defined,
                         "" if defined.any() else "no held-out row has a recent eGFR "
                         "below 60 and a UACR")


TITLES = {"kfre4": "Kidney Failure Risk Equation, 4 variables (Tangri 2011; 2016)"}


def check_units(task: Task, units: dict[str, str | None]) -> None:
    """A reference's inputs in the units its equation takes (here UACR in mg/g)."""
    if any(r.name == "kfre4" for r in task.references):
        unit = units.get("LAB//UACR")
        if unit is not None and unit.replace(" ", "").lower() not in ("mg/g", "mg/gcreat"):
            raise ValueError(f"the KFRE takes UACR in mg/g; LAB//UACR is in {unit}")


def score(ref: ReferenceScore, rows: pd.DataFrame, horizon_days: int) -> ReferenceRisk:
    if ref.name == "kfre4":
        return kfre4(rows, horizon_days, ref.region)
    raise ValueError(f"unknown reference score {ref.name!r}")  # the task schema prevents it


def evaluate_references(task: Task, rows: pd.DataFrame, data: EvalFrame,
                        model_risk: np.ndarray, *, n_boot: int, seed: int,
                        min_rows: int = 50, units: dict[str, str | None] | None = None
                        ) -> dict:
    """Each of the task's reference scores on the held-out ``rows`` (features included),
    beside the model's ``model_risk`` (rows × horizons) on the same rows."""
    out: dict = {}
    if units is not None:
        check_units(task, units)
    metric = task.promotion.primary_metric if task.promotion.primary_metric != "uno_c" \
        else "auroc"
    for ref in task.references:
        entry: dict = {"title": TITLES[ref.name], "region": ref.region, "horizons": {}}
        for i, h in enumerate(task.horizons_days):
            r = score(ref, rows, h)
            n = int(r.defined.sum())
            y = data.labels[h][r.defined]
            if n < min_rows or np.nansum(y == 1) < 5 or np.nansum(y == 0) < 5:
                entry["horizons"][str(h)] = {
                    "result": NOT_DEFINED, "rows": n,
                    "why": r.why or f"only {n} held-out rows where it is defined, "
                                    f"{int(np.nansum(y == 1))} with the outcome"}
                continue
            sub = data.subset(r.defined)
            ref_report = evaluate(r.risk[r.defined][:, None], sub, [h], n_boot=n_boot,
                                  seed=seed, min_subgroup=10**9)["horizons"][str(h)]
            model_report = evaluate(model_risk[r.defined, i:i + 1], sub, [h], n_boot=n_boot,
                                    seed=seed, min_subgroup=10**9)["horizons"][str(h)]
            diff = paired_difference(model_risk[r.defined, i], r.risk[r.defined], sub, h,
                                     metric, n_boot=n_boot, seed=seed)
            entry["horizons"][str(h)] = {
                "rows": n, "subjects": int(np.unique(sub.subject_id).size),
                "reference": {k: ref_report["rows"][k] for k in REPORTED},
                "model": {k: model_report["rows"][k] for k in REPORTED},
                f"model_minus_reference_{metric}": diff}
        out[ref.name] = entry
    return out


REPORTED = ("auroc", "auprc", "brier", "calibration_slope", "citl", "ece")


def reference_metrics(references: dict) -> dict[str, float]:
    """MLflow metric names: ``reference_<name>_<metric>_<H>d`` (and the model's figures
    on the same rows as ``reference_<name>_model_<metric>_<H>d``)."""
    out = {}
    for name, entry in references.items():
        for h, e in entry["horizons"].items():
            if e.get("result") == NOT_DEFINED:
                continue
            for who, prefix in (("reference", f"reference_{name}"),
                                ("model", f"reference_{name}_model")):
                for k, ci in e[who].items():
                    if np.isfinite(ci["estimate"]):
                        out[f"{prefix}_{k}_{h}d"] = ci["estimate"]
    return out


def reference_lines(references: dict, metric: str) -> list[str]:
    """What a training job prints of its reference scores."""
    lines = []
    for name, entry in references.items():
        for h, e in entry["horizons"].items():
            if e.get("result") == NOT_DEFINED:
                lines.append(f"  reference {name} at {h} days: not defined ({e['why']})")
                continue
            ref, mod = e["reference"][metric], e["model"][metric]
            d = e[f"model_minus_reference_{metric}"]
            lines.append(
                f"  reference {name} at {h} days, on the {e['rows']} held-out rows where it "
                f"is defined: {metric} {ref['estimate']:.3f} [{ref['lower']:.3f}, "
                f"{ref['upper']:.3f}]; the model {mod['estimate']:.3f} [{mod['lower']:.3f}, "
                f"{mod['upper']:.3f}]; difference {d['estimate']:+.3f} [{d['lower']:+.3f}, "
                f"{d['upper']:+.3f}]")
    return lines
