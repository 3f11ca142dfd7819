"""Serving benchmark (not a timed test), all on loopback, bounded in count and time.

    python bench/serve_bench.py [--twins 20000] [--requests 2000]

1. Re-forecast time for every twin after a new champion (20,000 twins, in process).
2. Latency p50/p99 and throughput at concurrency 1 and 16 for (a) reading a twin's
   forecast, (b) posting one event and getting the new forecast, and (c) the baseline:
   a bare FastAPI + LightGBM endpoint predicting one row with the same model — printed as
   ratios to the baseline.  The service runs with one worker pinned to core 0, the load
   generator pinned to core 1 (``taskset``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent


def setup(home: Path, twins: int) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from bench.features_bench import cohort
    from features.events import write_meds
    from features.simulate import CODES
    from features.task import load_task
    from serving.bootstrap import tracker_for
    from training.train import TrainOptions, train
    from twincast.settings import Settings

    path = cohort(OUT, twins)
    settings = Settings(home=home, task="eskd")
    t0 = time.perf_counter()
    small = home / "train_cohort"
    from features.events import read_events

    ev = read_events(path)
    write_meds(ev[ev["subject_id"] <= 5000], small, codes=CODES, overwrite=True)
    train(small, load_task(ROOT / "examples" / "tasks" / "eskd.yaml"), tracker_for(settings),
          TrainOptions(trials=2, n_bootstrap=20, families=["lightgbm"]), log=lambda m: None)
    print(f"  trained the served model in {time.perf_counter() - t0:.0f}s")
    load_twins(settings.database(), ev)


def load_twins(url: str, ev) -> None:
    from sqlalchemy import insert

    from serving.store.models import Event, Twin
    from serving.store.repo import idempotency_key, open_store, utcnow

    t0 = time.perf_counter()
    store = open_store(url)
    now = utcnow()
    g = ev.groupby("subject_id")
    last = g["time"].max()
    n = g.size()
    with store.write() as s:
        s.execute(insert(Twin), [{"subject_id": int(k), "created_at": now, "updated_at": now,
                                  "last_event_time": last[k].to_pydatetime(),
                                  "event_count": int(n[k])} for k in last.index])
        rows = []
        for r in ev.itertuples(index=False):
            t = None if r.time != r.time else r.time.to_pydatetime()
            v = None if r.numeric_value != r.numeric_value else float(r.numeric_value)
            rows.append({"subject_id": int(r.subject_id), "time": t, "code": str(r.code),
                         "numeric_value": v, "text_value": None, "recorded_at": now,
                         "idempotency_key": idempotency_key(int(r.subject_id), t, str(r.code),
                                                            v, None, None), "source": "bench"})
            if len(rows) == 50_000:
                s.execute(insert(Event), rows)
                rows = []
        if rows:
            s.execute(insert(Event), rows)
    print(f"  loaded {len(last):,} twins, {len(ev):,} events in {time.perf_counter() - t0:.0f}s")


def refresh_timing(home: Path) -> float:
    from serving.bootstrap import tracker_for
    from serving.model_source import ModelSource
    from serving.refresh import refresh_twins
    from serving.store.repo import open_store
    from twincast.settings import Settings

    settings = Settings(home=home, task="eskd")
    store = open_store(settings.database())
    model = ModelSource(tracker_for(settings), "eskd").load()
    job = store.claim_refresh(model.name, f"bench-{time.time()}", "bench")
    t0 = time.perf_counter()
    n = refresh_twins(store, model, job)
    wall = time.perf_counter() - t0
    print(f"  re-forecast of {n:,} twins after a reload: {wall:.1f}s "
          f"({n / wall:,.0f} twins/s)")
    return wall


def start(cmd: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(["taskset", "-c", "0", *cmd], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(log.read_text()[-3000:])


def load(url: str, method: str, concurrency: int, seconds: int, headers: list[str],
         paths: Path, bodies: Path | None = None) -> dict:
    """wrk (pinned to core 1) for ``seconds``; the Python load generator without wrk."""
    if shutil.which("wrk"):
        cmd = ["taskset", "-c", "1", "wrk", "-t", "1", "-c", str(concurrency), "-d",
               f"{seconds}s", "--timeout", "10s", "-s", str(ROOT / "bench" / "wrk_cycle.lua")]
        for h in headers:
            cmd += ["-H", h]
        cmd += [url, "--", str(paths), str(bodies or ""), method]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    else:
        cmd = ["taskset", "-c", "1", sys.executable, str(ROOT / "bench" / "loadgen.py"), url,
               "--method", method, "--concurrency", str(concurrency), "--requests", "100000",
               "--seconds", str(seconds), "--paths", str(paths)]
        for h in headers:
            cmd += ["--header", h]
        if bodies:
            cmd += ["--bodies", str(bodies)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    r["rps"] = r["count"] / r["wall_s"]
    return r


def cds_timing(url: str, private_key: str, issuer: str, n: int = 60) -> dict:
    """Sequential CDS Hooks calls, each a new patient with a few years of labs."""
    import uuid

    import httpx
    import jwt

    from tests.serving.test_cds import prefetch

    lat = []
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            pre = prefetch()
            pre["patient"] = {**pre["patient"], "id": f"bench-{i}", "identifier": [
                {"system": "urn:bench", "value": f"{uuid.uuid4()}"}]}
            for e in pre["observations"]["entry"]:
                e["resource"] = {**e["resource"], "subject": {"reference": f"Patient/bench-{i}"}}
            target = f"{url}/cds-services/twincast-eskd"
            now = int(time.time())
            tok = jwt.encode({"iss": issuer, "aud": target, "exp": now + 300, "iat": now,
                              "jti": str(uuid.uuid4())}, private_key, algorithm="RS384")
            body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                    "context": {"patientId": f"bench-{i}"}, "prefetch": pre}
            t0 = time.perf_counter()
            r = c.post(target, json=body, headers={"Authorization": f"Bearer {tok}"})
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    ms = np.array(lat)
    return {"n": n, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--twins", type=int, default=20_000)
    ap.add_argument("--seconds", type=int, default=15, help="per scenario")
    ap.add_argument("--keep", action="store_true", help="reuse bench/out/serve_home")
    args = ap.parse_args()
    home = OUT / "serve_home"
    if not (args.keep and (home / "twins.db").exists()):
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        print("setting up")
        setup(home, args.twins)
    print("reload")
    refresh = refresh_timing(home)

    from serving.bootstrap import tracker_for
    from serving.model_source import ModelSource
    from serving.store.repo import open_store
    from twincast.settings import Settings

    settings = Settings(home=home, task="eskd")
    store = open_store(settings.database())
    key = store.create_key(f"bench-{time.time():.0f}", "clinical")
    model = ModelSource(tracker_for(settings), "eskd").load()
    booster = model.bundle.models[-1].booster_
    booster.save_model(str(home / "baseline.txt"))
    with store.read() as s:
        ids = store.twin_ids(s)[: 5000]
    frame = store.events_frame(store.read(), ids[0])
    from features.events import EventArrays, events_from_frame

    ev = events_from_frame(frame.drop(columns="recorded_at"))
    x = model.bundle.features_for(EventArrays.from_events(ev), np.array([ids[0]]),
                                  np.array([ev["time"].max().value // 1000]))
    np.save(home / "row.npy", x[0])
    rng = random.Random(0)
    (home / "paths.txt").write_text("\n".join(f"/v1/twins/{rng.choice(ids)}"
                                               for _ in range(10_000)))
    base_t = ev["time"].max()
    bodies = []
    for i in range(20_000):
        t = (base_t + np.timedelta64(1 + i, "m")).isoformat() + "Z"
        bodies.append(json.dumps({"events": [{"time": t, "code": "VITAL//SBP",
                                              "numeric_value": 120 + i % 30}]}))
    (home / "bodies.jsonl").write_text("\n".join(bodies))
    (home / "event_paths.txt").write_text("\n".join(f"/v1/twins/{ids[i % len(ids)]}/events"
                                                     for i in range(len(bodies))))
    env = {**os.environ, "TWINCAST_HOME": str(home), "TWINCAST_TASK": "eskd",
           "BENTOML_HOME": str(home / "bentoml"), "TWINCAST_WORKERS": "1",
           "BENTOML_DO_NOT_TRACK": "true"}
    auth = [f"Authorization: Bearer {key}", "content-type: application/json"]
    results = {}
    from tests.serving.conftest import CDS_ISSUER, cds_keypair

    cds_private, cds_public = cds_keypair()
    env["TWINCAST_CDS_CLIENTS"] = json.dumps({CDS_ISSUER: {"public_key": cds_public,
                                                           "algorithms": ["RS384"]}})
    svc = start([str(BIN / "bentoml"), "serve", "serving.service:Twincast", "--host",
                 "127.0.0.1", "--port", "3811"], env, "http://127.0.0.1:3811/v1/health",
                home / "service.log")
    try:
        for c in (1, 16):
            results[("read", c)] = load("http://127.0.0.1:3811", "GET", c, args.seconds, auth,
                                        home / "paths.txt")
            results[("post", c)] = load("http://127.0.0.1:3811", "POST", c, args.seconds,
                                        auth, home / "event_paths.txt", home / "bodies.jsonl")
        cds = cds_timing("http://127.0.0.1:3811", cds_private, CDS_ISSUER)
    finally:
        svc.terminate()
        svc.wait(30)
    benv = {**os.environ, "BASELINE_MODEL": str(home / "baseline.txt"),
            "BASELINE_ROW": str(home / "row.npy")}
    base = start([str(BIN / "uvicorn"), "bench.baseline_app:app", "--host", "127.0.0.1",
                  "--port", "3812", "--log-level", "warning"], benv,
                 "http://127.0.0.1:3812/docs", home / "baseline.log")
    try:
        (home / "predict.txt").write_text("/predict\n")
        for c in (1, 16):
            results[("baseline", c)] = load("http://127.0.0.1:3812", "POST", c, args.seconds,
                                            [], home / "predict.txt")
    finally:
        base.terminate()
        base.wait(30)
    print(f"{'scenario':<34}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'errors':>8}"
          f"{'max ms':>8}{'p50/base':>10}{'p99/base':>10}")
    names = {"read": "(a) GET /v1/twins/{id}", "post": "(b) POST /v1/twins/{id}/events",
             "baseline": "(c) bare FastAPI + LightGBM"}
    for (kind, c), r in results.items():
        b = results[("baseline", c)]
        print(f"{names[kind]:<34}{c:>5}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['rps']:>8.0f}"
              f"{r['errors']:>8}{r['max_ms']:>8.0f}{r['p50_ms'] / b['p50_ms']:>10.1f}"
              f"{r['p99_ms'] / b['p99_ms']:>10.1f}")
    print(f"re-forecast of {args.twins:,} twins: {refresh:.1f}s")
    print(f"CDS Hooks patient-view with prefetch (JWT, FHIR import, forecast, card), "
          f"{cds['n']} calls one at a time: p50 {cds['p50']:.0f} ms, p99 {cds['p99']:.0f} ms "
          f"(the specification asks for about 500 ms)")


if __name__ == "__main__":
    main()
