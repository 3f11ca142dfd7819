"""Monitoring benchmark (not a timed test).

    python bench/monitor_bench.py [--sims 200] [--deploy 1000] [--forecasts 1000000]

1. **False alarms.**  One model trained on a steady synthetic population
   (``simulate_cohort(steady=True)``: enrolment 1990–2024, every calendar window alike
   once enrolment and exits balance); then ``--sims`` new populations from the same
   generator (unshifted), each forecast at the task's prediction times by the model and
   judged by one monitoring run from 2000 on in windows of ``--window`` days (realised
   metrics, drift, alerts; Bonferroni over the run's tests).  Prints the share of runs
   with any alert — the family-wise false-alarm rate, whose bar is ``alpha`` (5%) —
   with its binomial 95% interval.  Baselines measured in the same run: the same
   populations with the eGFR assay reading 30% high from mid-2012 (the share that
   alerts: the power), and closed cohorts (the default simulator: enrolment 2012–2018)
   judged in one window and in yearly windows — a closed cohort ages, so its later
   years are further into follow-up than the pooled training rows: a real drift of the
   population, which yearly windows see.
2. **Scale.**  A SQLite twin store holding ``--forecasts`` stored forecasts (every visit
   of enough synthetic patients, made a day after it, with the model's risks) and their
   histories; ``monitor`` over all of it: wall time (bar: under 60 s) and peak memory,
   measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
US_PER_DAY = 86_400_000_000


def train_model(home: Path, subjects: int, steady: bool):
    from features.events import write_meds
    from features.simulate import CODES, simulate_cohort
    from features.task import load_task
    from serving.model_source import ModelSource
    from training.tracking import Tracker
    from training.train import TrainOptions, train

    cohort = write_meds(simulate_cohort(subjects, seed=0, steady=steady),
                        home / ("train_steady" if steady else "train"), codes=CODES,
                        shard_subjects=10_000)
    name = "mlflow_steady" if steady else "mlflow"
    tracker = Tracker(f"sqlite:///{home / f'{name}.db'}", (home / f"art_{name}").as_uri())
    result = train(cohort, load_task(ROOT / "examples" / "tasks" / "eskd.yaml"), tracker,
                   TrainOptions(trials=2, n_bootstrap=100, seed=0, families=["lightgbm"]),
                   log=lambda m: None)
    if not result.promoted:
        print(f"  (not promoted: {result.reason}; monitored all the same)")
    return ModelSource(tracker, "eskd").load(result.version)


def one_run(model, seed: int, n: int, shift, window_days: int, steady: bool,
            since: str | None = None) -> dict:
    """One deployment cohort, forecast at the task's prediction times, judged once."""
    from features.events import EventArrays
    from features.labels import derive_labels
    from features.simulate import simulate_cohort
    from serving.monitoring import VersionData, judge

    events = simulate_cohort(n, seed=seed, first_subject_id=10_000_000, shift=shift,
                             steady=steady)
    arrays = EventArrays.from_events(events)
    task = model.bundle.task
    rows = derive_labels(arrays, task)
    sid = rows["subject_id"].to_numpy()
    t = rows["prediction_time"].to_numpy("datetime64[us]").view(np.int64)
    risk = model.bundle.predict_features(model.bundle.features_for(arrays, sid, t))
    now = int(arrays.time_us.max())
    lo = int(t.min()) if since is None else int(np.datetime64(since, "us").view(np.int64))
    keep = t >= lo
    out = judge(task, arrays, sid[keep], t[keep],
                np.full(int(keep.sum()), model.version, dtype=object), risk[keep],
                lambda v: VersionData(model.bundle, model.metrics), lo=lo,
                hi=now + 1, now_us=now, window_days=window_days)
    return {"alerts": len(out["alerts"]), "tests": out["tests"],
            "kinds": sorted({a["kind"] for a in out["alerts"]})}


def false_alarms(steady_model, closed_model, sims: int, n: int, window: int) -> None:
    from features.simulate import Shift

    cases = [(f"steady population, {window}-day windows from 2000", steady_model, True,
              window, "2000-01-01", Shift.parse("egfr_assay:1.3@2012-07-01"), sims),
             ("closed cohort, one window", closed_model, False, 10_000, None,
              Shift.parse("egfr_assay:1.3@2000-01-01"), min(sims, 50)),
             ("closed cohort, yearly windows", closed_model, False, 365, None,
              Shift.parse("egfr_assay:1.3@2000-01-01"), min(sims, 50))]
    for label, model, steady, window, since, shift, k in cases:
        fired = metric_fired = drift_fired = tests = 0
        t0 = time.perf_counter()
        for i in range(k):
            r = one_run(model, 1000 + i, n, None, window, steady, since)
            fired += r["alerts"] > 0
            metric_fired += "metric" in r["kinds"]
            drift_fired += "drift" in r["kinds"]
            tests += r["tests"]
        lo, hi = _binomial_ci(fired, k)
        print(f"unshifted, {label}: {fired}/{k} runs alerted = {fired / k:.1%} "
              f"[{lo:.1%}, {hi:.1%}] (bar: at most 5%); metric alerts in {metric_fired}, "
              f"drift alerts in {drift_fired} runs; {tests / k:.0f} tests a run; "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        m = min(k, 20)
        power = sum(one_run(model, 1000 + i, n, shift, window, steady, since)["alerts"] > 0
                    for i in range(m))
        print(f"  baseline, the same with {shift.describe()}: {power}/{m} runs alerted",
              flush=True)


def _binomial_ci(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import beta

    lo = beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def build_store(home: Path, model, forecasts: int) -> str:
    """A SQLite store with about ``forecasts`` stored forecasts (every visit, made a day
    later) and the histories behind them, written directly (this is the reader's bench)."""
    import sqlite3

    from features.events import EventArrays
    from features.labels import visit_times
    from features.simulate import simulate_cohort
    from serving.store import open_store

    per_subject = 22  # visits per synthetic patient, about
    n = forecasts // per_subject + 1
    t0 = time.perf_counter()
    events = simulate_cohort(n, seed=5, first_subject_id=1)
    arrays = EventArrays.from_events(events)
    sid, t = visit_times(arrays, model.bundle.task)
    if sid.size > forecasts:
        sid, t = sid[:forecasts], t[:forecasts]
    risk = np.empty((sid.size, len(model.bundle.horizons)))
    for i in range(0, sid.size, 200_000):
        risk[i:i + 200_000] = model.bundle.predict_features(
            model.bundle.features_for(arrays, sid[i:i + 200_000], t[i:i + 200_000]))
    url = f"sqlite:///{home / 'big.db'}"
    open_store(url).dispose()
    db = sqlite3.connect(home / "big.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")

    def iso(us):
        return np.datetime_as_string(us.astype("datetime64[us]"), unit="us")

    subjects = np.unique(events["subject_id"].to_numpy())
    db.executemany("INSERT INTO twins (subject_id, created_at, updated_at, event_count) "
                   "VALUES (?, '2025-01-01 00:00:00', '2025-01-01 00:00:00', 0)",
                   [(int(s),) for s in subjects])
    ev_t = events["time"].to_numpy("datetime64[us]")
    rec = np.where(np.isnat(ev_t), np.datetime64("2012-01-01", "us"), ev_t) \
        + np.timedelta64(1, "D")
    times = [None if np.isnat(x) else str(x).replace("T", " ") for x in ev_t]
    db.executemany(
        "INSERT INTO events (subject_id, time, code, numeric_value, text_value, recorded_at, "
        "idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
        zip(events["subject_id"].tolist(), times, events["code"].tolist(),
            [None if np.isnan(v) else float(v) for v in events["numeric_value"]],
            [None] * len(events), [str(x).replace("T", " ") for x in rec],
            [f"k{i}" for i in range(len(events))], strict=True))
    as_of = [s.replace("T", " ") for s in iso(t)]
    created = [s.replace("T", " ") for s in iso(t + US_PER_DAY)]
    hs = model.bundle.horizons
    db.executemany(
        "INSERT INTO forecasts (forecast_id, subject_id, as_of, status, risks, model_name, "
        "model_version, run_id, feature_spec_digest, task_digest, code_version, "
        "requested_by, created_at, row_digest, digest_version) VALUES "
        "(?, ?, ?, 'ok', ?, ?, ?, ?, 'x', 'x', 'x', 'bench', ?, 'x', 2)",
        ((str(uuid.uuid4()), int(s), a, json.dumps({f"{h}d": float(r[j])
                                                     for j, h in enumerate(hs)}),
          model.name, model.version, model.run_id, c)
         for s, a, r, c in zip(sid.tolist(), as_of, risk, created, strict=True)))
    db.commit()
    db.close()
    print(f"store: {sid.size:,} forecasts, {len(events):,} events, {subjects.size:,} twins "
          f"(built in {time.perf_counter() - t0:.0f}s)", flush=True)
    return url


def _monitor_child(url: str, home: str, q) -> None:
    from serving.model_source import ModelSource
    from serving.monitoring import VersionData, monitor
    from serving.store import open_store
    from training.tracking import Tracker

    model = ModelSource(Tracker(f"sqlite:///{Path(home) / 'mlflow.db'}",
                                (Path(home) / "art_mlflow").as_uri()), "eskd").load()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = open_store(url)
    t0 = time.perf_counter()
    report = monitor(store, model.bundle.task, model.name,
                     lambda v: VersionData(model.bundle, model.metrics))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put({"wall": wall, "peak_mib": peak / 1024, "base_mib": base / 1024,
           "counted": report["forecasts"]["counted"], "stored": report["forecasts"]["stored"],
           "windows": len(report["versions"][model.version]["windows"]),
           "alerts": len(report["alerts"]), "tests": report["tests"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--deploy", type=int, default=3000, help="patients per simulation")
    ap.add_argument("--window", type=int, default=365, help=(
        "days per window of the steady runs (a window is judged with at least 100 matured "
        "patients and 10 outcomes: 90-day windows need ~10,000 patients per simulation)"))
    ap.add_argument("--train", type=int, default=5000, help="patients the model learns from")
    ap.add_argument("--forecasts", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3, help="timed monitoring runs (median)")
    ap.add_argument("--skip-alarms", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        model = train_model(home, args.train, steady=False)
        steady = None if args.skip_alarms else train_model(home, args.train, steady=True)
        print(f"trained on {args.train:,} patients in {time.perf_counter() - t0:.0f}s",
              flush=True)
        if not args.skip_alarms:
            false_alarms(steady, model, args.sims, args.deploy, args.window)
        if args.forecasts:
            url = build_store(home, model, args.forecasts)
            ctx = mp.get_context("spawn")
            runs = []
            for _ in range(args.runs):
                q = ctx.Queue()
                p = ctx.Process(target=_monitor_child, args=(url, str(home), q))
                p.start()
                runs.append(q.get())
                p.join()
                print(f"  monitor: {runs[-1]}", flush=True)
            wall = float(np.median([r["wall"] for r in runs]))
            peak = float(np.median([r["peak_mib"] for r in runs]))
            print(f"monitoring {runs[0]['stored']:,} stored forecasts ({runs[0]['counted']:,} "
                  f"counted, {runs[0]['windows']} windows): median {wall:.1f}s (bar: under "
                  f"60 s), peak memory {peak:,.0f} MiB (the process had {runs[0]['base_mib']:,.0f} "
                  "MiB before)")


if __name__ == "__main__":
    main()
