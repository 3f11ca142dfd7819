"""How far is the associational what-if from the true effect?  (not a timed test)

    python bench/whatif_truth.py [--subjects 20000] [--month 24] [--task eskd]

The simulator knows what an SGLT2 inhibitor does (it slows the fall of eGFR by 40%).
Simulate the same patients twice (``features.simulate.Intervention``): in month M of
follow-up everyone still followed has a visit, at which an SGLT2 inhibitor is started
(one world) or not (the other, which then follows its natural course).  The histories
are the same up to that visit.  For the patients not yet on one:

* **true effect**: their kidney failure within 730 days of the visit, and their eGFR
  measured about a year later, in the treated world minus the untreated one (paired by
  patient; a subject bootstrap gives the interval);
* **what-if**: the champion's ``RX//SGLT2`` scenario at the visit minus its baseline,
  computed by ``serving.whatif.what_if`` from the untreated history — what the service
  answers.

The what-if learns from who was given the drug in the records (diabetes, an eGFR below
60: sicker patients), so it is confounded by indication; the true effect is what giving
it would do.  The test (``tests/serving/test_whatif_truth.py``) runs this on a small
cohort; the README quotes this script's figures on the demo's model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
DRUG = "RX//SGLT2"
HORIZON = 730
US_PER_DAY = 86_400_000_000


def _mean_ci(per_patient: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = per_patient[np.isfinite(per_patient)]
    boots = [x[rng.integers(0, x.size, x.size)].mean() for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"estimate": float(x.mean()), "lower": float(lo), "upper": float(hi),
            "patients": int(x.size)}


def _eskd_by(frame: pd.DataFrame, sids: np.ndarray, t_us: np.ndarray) -> np.ndarray:
    """1.0 if the patient's kidney failure falls in (t, t + 730 d], else 0.0 (death first
    or no failure seen: the cumulative incidence's indicator, loss to follow-up alike in
    both worlds)."""
    ev = frame[frame["code"].astype(str).isin(["DX//ESKD", "MEDS_DEATH"])]
    first = ev.sort_values("time").groupby("subject_id").first()
    out = np.zeros(sids.size)
    for i, (sid, t) in enumerate(zip(sids, t_us, strict=True)):
        if sid in first.index:
            row = first.loc[sid]
            when = pd.Timestamp(row["time"]).value // 1000
            if str(row["code"]) == "DX//ESKD" and t < when <= t + HORIZON * US_PER_DAY:
                out[i] = 1.0
    return out


def compare(model, n_subjects: int, seed: int, month: int) -> dict:
    """The true effect and the what-if's answer, on the same patients (see the module)."""
    from features.events import EventArrays
    from features.simulate import Intervention, simulate_cohort
    from features.targets import target_column, trajectory_targets
    from serving.whatif import ScenarioEvent, check_scenario, what_if

    treated = simulate_cohort(n_subjects, seed, intervention=Intervention(month, True))
    control = simulate_cohort(n_subjects, seed, intervention=Intervention(month, False))
    starts_t = treated[treated["code"].astype(str) == DRUG][["subject_id", "time"]]
    starts_c = control[control["code"].astype(str) == DRUG][["subject_id", "time"]]
    merged = starts_t.merge(starts_c, how="left", indicator=True)
    started = merged[merged["_merge"] == "left_only"].drop_duplicates("subject_id")
    sids = started["subject_id"].to_numpy(np.int64)
    t_us = started["time"].to_numpy().astype("datetime64[us]").view(np.int64)
    true_fail = _eskd_by(treated, sids, t_us) - _eskd_by(control, sids, t_us)
    task = model.bundle.task
    targets = getattr(task, "trajectories", [])
    code = targets[0].code if targets else "LAB//EGFR"
    col = target_column(code, 365)
    egfr = {}
    for name, frame in (("treated", treated), ("control", control)):
        arrays = EventArrays.from_events(frame)
        egfr[name] = trajectory_targets(arrays, task, sids, t_us).get(col, np.full(sids.size,
                                                                                   np.nan))
    true_egfr = egfr["treated"] - egfr["control"]
    # the what-if, from the untreated world's history up to the visit
    by_sid = control.groupby("subject_id", sort=False)
    scenario = [ScenarioEvent(DRUG)]
    check_scenario(model, scenario, "admin")
    h = f"{HORIZON}d"
    assoc_fail = np.full(sids.size, np.nan)
    assoc_egfr = np.full(sids.size, np.nan)
    for i, (sid, t) in enumerate(zip(sids, t_us, strict=True)):
        ev = by_sid.get_group(sid)
        times = ev["time"].to_numpy().astype("datetime64[us]").view(np.int64)
        keep = ev[(times <= t) | np.isnat(ev["time"].to_numpy())]
        rows = list(zip(keep["subject_id"].tolist(), keep["time"].to_numpy(),
                        keep["code"].astype(str).tolist(),
                        keep["numeric_value"].to_numpy(np.float64).tolist(), strict=True))
        ans = what_if(model, int(sid), rows, scenario,
                      pd.Timestamp(t, unit="us").to_pydatetime())
        if ans["difference"] is None:
            continue
        assoc_fail[i] = ans["difference"]["risks"][h]
        paths = [d for d in ans["difference"]["trajectories"]
                 if d["code"] == code and d["horizon_days"] == 365]
        if paths:
            assoc_egfr[i] = paths[0]["median"]
    ok = np.isfinite(assoc_fail)
    return {"month": month, "patients": int(ok.sum()),
            "true_failure_730d": _mean_ci(true_fail[ok]),
            "what_if_failure_730d": _mean_ci(assoc_fail[ok]),
            "true_egfr_365d": _mean_ci(true_egfr[ok]),
            "what_if_egfr_365d": _mean_ci(assoc_egfr[ok])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--month", type=int, default=24)
    ap.add_argument("--task", default="eskd")
    args = ap.parse_args()
    from serving.model_source import ModelSource
    from training.tracking import Tracker
    from twincast.settings import Settings

    settings = Settings()
    source = ModelSource(Tracker(settings.tracking_uri(), settings.artifact_root()), args.task)
    version = source.champion_version()
    model = source.load(version)
    res = compare(model, args.subjects, args.seed, args.month)
    print(f"{res['patients']:,} patients not on an SGLT2 inhibitor at month {res['month']}, "
          f"champion version {version}:")
    for what, unit in (("failure_730d", "kidney failure within 730 days (risk)"),
                       ("egfr_365d", "eGFR about a year later (ml/min/1.73m²)")):
        t, a = res[f"true_{what}"], res[f"what_if_{what}"]
        print(f"  {unit}: true effect {t['estimate']:+.4f} [{t['lower']:+.4f}, "
              f"{t['upper']:+.4f}] ({t['patients']:,} patients); what-if "
              f"{a['estimate']:+.4f} [{a['lower']:+.4f}, {a['upper']:+.4f}]")


if __name__ == "__main__":
    main()
