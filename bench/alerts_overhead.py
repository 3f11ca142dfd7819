"""What the care team's risks and alerts add to a one-event write: the write path in
process, one new event to a twin with its whole history, alternating with and without
the ``twin_risks`` / alert step (the same writes, the same store), medians of several
rounds.  Uses the model ``bench/ui_bench.py`` trained (run that once first).

    .venv/bin/python bench/alerts_overhead.py [--db sqlite|postgresql] [--writes 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="sqlite")
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import pandas as pd

    from bench.features_bench import cohort
    from bench.serve_bench import config, fresh_pg
    from features.events import read_events
    from serving.bootstrap import build_service
    from serving.store.twins import EventRow
    from serving.writes import Caller, TwinInput

    home = ROOT / "bench" / "out" / "ui_home"
    if not (home / "mlflow.db").exists():
        sys.exit("run bench/ui_bench.py first (it trains the served model)")
    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp / 'twins.db'}" if args.db == "sqlite" else fresh_pg("tc_alerts_oh")
    svc = build_service(config(home, url), start=False)
    svc.models.follow_champion("bench")
    ev = read_events(cohort(ROOT / "bench" / "out", 100_000))
    ev = ev[ev["subject_id"] < 40]
    end = pd.Timestamp.now(tz="UTC").tz_localize(None) - pd.Timedelta(days=400)
    ev = ev.assign(time=ev["time"] + (end - ev["time"].max()))
    ev = ev[~ev["code"].isin(["DX//ESKD", "MEDS_DEATH", "ADMIN//END_OF_FOLLOWUP"])]
    sids = sorted(int(s) for s in ev["subject_id"].unique())
    last = {}
    for sid, part in ev.groupby("subject_id"):
        rows = [EventRow(None if pd.isna(r.time) else r.time.to_pydatetime(), str(r.code),
                         None if pd.isna(r.numeric_value) else float(r.numeric_value), None)
                for r in part.itertuples()]
        svc.writer.write([TwinInput(int(sid), events=rows)], Caller("bench"), None)
        last[int(sid)] = part["time"].max().to_pydatetime()
    hook = svc.writer._risks
    timings: dict[str, list[float]] = {"with risks and alerts": [], "without": []}
    k = 0
    for _ in range(args.rounds):
        for name in timings:
            svc.writer._risks = hook if name.startswith("with") else (lambda *a, **kw: None)
            ms = []
            for _ in range(args.writes // args.rounds):
                sid = sids[k % len(sids)]
                k += 1
                t = last[sid] + timedelta(minutes=k)
                t0 = time.perf_counter()
                svc.writer.write([TwinInput(sid, events=[EventRow(t, "VITAL//SBP",
                                                                   120.0 + k % 30, None)])],
                                 Caller("bench"), None)
                ms.append((time.perf_counter() - t0) * 1000)
            timings[name].append(statistics.median(ms))
    svc.writer._risks = hook
    a, b = (statistics.median(v) for v in timings.values())
    print(f"[{args.db}] one-event write, median of {args.rounds} rounds' medians: "
          f"with risks and alerts {a:.2f} ms, without {b:.2f} ms: +{a - b:.2f} ms "
          f"({a / b:.2f}x)")
    svc.store.dispose()


if __name__ == "__main__":
    main()
