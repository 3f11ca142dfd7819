"""Where a one-event write's time goes, in process (not a timed test).

    python bench/write_stages.py [--url URL] [--writes 600] [--runs 5]

Uses the store and the served model ``bench/serve_bench.py --keep`` left behind
(``bench/out``): twins with about 150 events, each sent one new event at a time, as the
events route does — the key (as this worker remembers it), body parse, the write (plan:
read, history, forecast; commit under the lock; cache), answer — beside two baselines
measured in the same run: the model's scores for one row, and a read of a twin's row plus
a committed access row on the same database (the work a bare endpoint does).  Also counts
SQL statements and connection checkouts per write.  Medians of ``--runs`` runs, each the
median over ``--writes`` writes; stages nest (plan holds history and forecast).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
OUT = ROOT / "bench" / "out"


class Clock:
    """Per-stage wall time of the current write (seconds), by name."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.now[name] += time.perf_counter() - t0

    def wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a, **k):
            with self.stage(name):
                return inner(*a, **k)

        setattr(owner, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="the twin store (default: the one serve_bench kept)")
    ap.add_argument("--writes", type=int, default=600)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", type=int, metavar="N", default=0,
                    help="also print the N functions with the most own time (cProfile)")
    ap.add_argument("--profile-only", metavar="METHOD", default="",
                    help="profile only this TwinWriter method (e.g. _commit, _plan)")
    args = ap.parse_args()
    url = args.url or max(OUT.glob("twins_*.url"), key=lambda p: p.stat().st_mtime
                          ).read_text()

    import numpy as np
    from sqlalchemy import event, text

    import serving.writes as W
    from bench.serve_bench import config
    from serving.api import schemas as S
    from serving.api.responses import json_response
    from serving.bootstrap import build_service
    from serving.runtime import tune_gc
    from serving.writes import AccessInfo, Caller, TwinInput

    svc = build_service(config(OUT / "serve_home", url), start=False)
    model = svc.models.sync_to(svc.source.champion_version())
    tune_gc()  # as the service does once started
    store = svc.store
    name = f"stages-{uuid.uuid4().hex[:6]}"
    token = store.keys.create(name, "clinical")
    try:
        # the serving benchmark's twins: alive, the ~150-event histories closest to 150
        from bench.features_bench import cohort
        from bench.serve_data import hot_twins
        from features.events import read_events

        n_twins = int(url.rsplit("_", 1)[-1].split(".")[0])  # twins_sqlite_N.db, .._bench_N
        hot = hot_twins(read_events(cohort(OUT, n_twins)))
        with store.read() as s:
            rows = store.twins.peek(s, hot)
        twins = [(sid, rows[sid].last_event_time) for sid in hot if sid in rows
                 and rows[sid].last_event_time is not None]
        assert twins, "no twins with about 150 events: run bench/serve_bench.py --keep first"
        statements = checkouts = 0

        sql_time: dict[str, float] = defaultdict(float)  # per kind of statement, this run
        started: list[float] = []

        def on_statement(conn, cursor, sql, *_):
            nonlocal statements
            statements += 1
            started.append(time.perf_counter())

        def after_statement(conn, cursor, sql, *_):
            sql_time[" ".join(sql.split()[:4])[:40]] += time.perf_counter() - started.pop()

        def on_checkout(*_):
            nonlocal checkouts
            checkouts += 1

        event.listen(store.engine, "before_cursor_execute", on_statement)
        event.listen(store.engine, "after_cursor_execute", after_statement)
        dialect = store.engine.dialect
        do_commit = dialect.do_commit

        def timed_commit(dbapi_connection):
            t0 = time.perf_counter()
            try:
                return do_commit(dbapi_connection)
            finally:
                sql_time["COMMIT"] += time.perf_counter() - t0

        dialect.do_commit = timed_commit
        event.listen(store.engine.pool, "checkout", on_checkout)
        clock = Clock()
        clock.wrap(svc.writer, "_plan", "write: plan")
        clock.wrap(W, "forecast_batch", "write: plan: forecast")
        clock.wrap(W.History, "from_columns", "write: plan: history")
        clock.wrap(svc.writer, "_commit", "write: commit (under the lock)")
        clock.wrap(svc.writer, "_keep", "write: keep in the cache")
        clock.wrap(store.db, "transact", "write: transaction (holds the commit)")
        row = np.zeros((1, len(model.bundle.spec.feature_names)), np.float64)

        def baseline_db(sid: int) -> None:
            with store.engine.begin() as conn:
                conn.execute(text("SELECT view FROM twins WHERE subject_id = :s"),
                             {"s": sid}).scalar_one_or_none()
                conn.execute(text(
                    "INSERT INTO access_log (time, method, path, action, subject_id, "
                    "status_code) VALUES (:t, 'GET', '/b', 'baseline', :s, 200)"),
                    {"t": W.utcnow(), "s": sid})

        runs: list[dict[str, float]] = []
        prof = cProfile.Profile()
        if args.profile and args.profile_only:  # one of the writer's methods alone
            inner = getattr(svc.writer, args.profile_only)

            def profiled(*a, **k):
                if not runs:  # the warm-up run is not counted
                    return inner(*a, **k)
                prof.enable()
                try:
                    return inner(*a, **k)
                finally:
                    prof.disable()

            setattr(svc.writer, args.profile_only, profiled)
        sent = 0
        for _ in range(args.runs + 1):  # the first run warms the cache and is not counted
            per: dict[str, list[float]] = defaultdict(list)
            s0, c0 = statements, checkouts
            sql_time.clear()
            for i in range(args.writes):
                sid, last = twins[i % len(twins)]
                last = last if not isinstance(last, str) else W.datetime.fromisoformat(last)
                sent += 1
                t = (last + timedelta(days=1, seconds=sent)).isoformat() + "Z"
                raw = json.dumps({"events": [{"time": t, "code": "VITAL//SBP",
                                              "numeric_value": 120 + i % 30}]}).encode()
                clock.now.clear()
                t0 = time.perf_counter()
                with clock.stage("key (as remembered; confirmed by the write)"):
                    key = store.keys.recall(token)
                with clock.stage("parse body"):
                    body = S.EventsIn.model_validate_json(raw)
                    inp = TwinInput(sid, events=[e.to_row() for e in body.events],
                                    caller=Caller(key.name, key.id, key.role, confirm=True),
                                    access=AccessInfo("POST", f"/v1/twins/{sid}/events",
                                                      "ingest_events"))
                with clock.stage("write"):
                    profiling = args.profile and runs and not args.profile_only
                    if profiling:
                        prof.enable()
                    out = svc.coalescer.write(inp)
                    if profiling:
                        prof.disable()
                with clock.stage("answer"):
                    json_response({"added": out.added, "duplicates": out.duplicates,
                                   "forecast": out.forecast})
                clock.now["total"] = time.perf_counter() - t0
                for k, v in clock.now.items():
                    per[k].append(v)
                t1 = time.perf_counter()
                baseline_db(sid)
                per["baseline: row read + access row commit"].append(time.perf_counter() - t1)
                t1 = time.perf_counter()
                model.bundle.raw_scores(row)
                per["baseline: the model's scores for one row"].append(time.perf_counter() - t1)
            runs.append({k: statistics.median(v) * 1e3 for k, v in per.items()}
                        | {"statements": (statements - s0) / args.writes,
                           "checkouts": (checkouts - c0) / args.writes}
                        | {f"sql: {k}": v * 1e3 / args.writes for k, v in sql_time.items()})
        runs = runs[1:]
        hits, misses = svc.writer.cache.hits, svc.writer.cache.misses
        print(f"one-event write to {len(twins)} twins of ~150 events, {url.split(':')[0]}, "
              f"medians of {args.runs} runs x {args.writes} writes (ms):")
        for k in runs[0]:
            vals = [r.get(k, 0.0) for r in runs]
            unit = "" if k in ("statements", "checkouts") else " ms"
            if k.startswith("sql: "):
                unit += " (mean)"
            print(f"  {k:<42} {statistics.median(vals):8.3f}{unit}   "
                  f"[{min(vals):.3f} .. {max(vals):.3f}]")
        total = statistics.median(r["total"] for r in runs)
        base = statistics.median(r["baseline: row read + access row commit"] for r in runs)
        print(f"  total / same-db baseline: {total / base:.2f}x; cache hits {hits}, "
              f"misses {misses}")
        if args.profile:
            order = os.environ.get("SORT", "tottime")  # or cumulative
            pstats.Stats(prof).sort_stats(order).print_stats(args.profile)
    finally:  # the bench's key does not outlive it
        store.keys.revoke(name)
        store.dispose()


if __name__ == "__main__":
    main()
