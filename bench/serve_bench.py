"""Serving benchmark (not a timed test): all on loopback, bounded in count and time.

    python bench/serve_bench.py [--db sqlite,postgresql] [--twins 100000] [--seconds 10]
                                [--runs 3]

Per database, one worker (pinned to core 0; the load generator, wrk, to core 1):

1. re-forecast of every twin (``--twins``, the synthetic cohort's histories) by the
   refresh, in process, as a worker runs it after a reload;
2. latency and throughput at concurrency 1 and 16 of GET /v1/twins/{id} and of a
   one-event POST /v1/twins/{id}/events to twins with ~150 events, and of a what-if
   (one hypothetical blood pressure) on the same twins — medians of
   ``--runs`` runs — each beside two baselines measured in the same run: a bare FastAPI
   + LightGBM endpoint, and one that also reads the twin's row and commits an access
   row on the same database;
3. the bulk route: 1,000 twins x 20 events per request (new twins, and existing ones);
4. the one-event POST while the service itself re-forecasts every twin after a new
   champion, against the idle figure;
5. CDS Hooks patient-view calls with prefetch, one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("TWINCAST_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
PORT, BASE_PORT = 3811, 3812


def fresh_pg(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def config(home: Path, db_url: str, **over):
    from serving.config import ServingConfig

    return ServingConfig(database_url=db_url, tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                         artifact_root=(home / "mlartifacts").as_uri(), task="eskd",
                         model_poll_seconds=0, **over)


def refresh_in_process(home: Path, db_url: str) -> tuple[int, float]:
    """Every twin re-forecast by the refresh (as after a reload), timed."""
    from serving.bootstrap import build_service

    svc = build_service(config(home, db_url), start=False)
    _, job = svc.models.follow_champion("bench")
    model = svc.models.current()
    job = job or svc.store.jobs.ensure_job(model.name, model.version)
    assert job is not None and svc.store.jobs.claim(model.name, model.version, svc.worker,
                                                    600) == job
    t0 = time.perf_counter()
    svc.refresher.run(job, model)
    wall = time.perf_counter() - t0
    done = svc.refresh_status()
    assert done["state"] == "done" and done["verified"], done
    svc.store.dispose()
    return done["done"], wall


def start(cmd: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    import httpx

    with open(log, "w") as out:
        proc = subprocess.Popen(["taskset", "-c", "0", *cmd], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(log.read_text()[-3000:])


def wrk(url: str, method: str, concurrency: int, seconds: int, headers: list[str],
        paths: Path, bodies: Path | None = None) -> dict:
    cmd = ["taskset", "-c", "1", "wrk", "-t", "1", "-c", str(concurrency), "-d",
           f"{seconds}s", "--timeout", "10s", "-s", str(ROOT / "bench" / "wrk_cycle.lua")]
    for h in headers:
        cmd += ["-H", h]
    cmd += [url, "--", str(paths), str(bodies or ""), method]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    r["rps"] = r["count"] / r["wall_s"]
    return r


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms", "rps",
                                                                "errors", "max_ms")}


SALT_S = random.SystemRandom().randrange(0, 20 * 86_400)  # new event times every invocation


def bodies_for(home: Path, name: str, twins: list[int], last_time, n: int = 40_000) -> tuple:
    """One new event per request, each at its own time, cycling over ``twins`` (times
    shifted by a per-invocation salt, so a kept store never sees them as re-sent)."""
    bodies, paths = [], []
    for i in range(n):
        t = (last_time + np.timedelta64(SALT_S + 60 * (1 + i), "s")).astype("datetime64[s]")
        bodies.append(json.dumps({"events": [{"time": f"{t}Z", "code": "VITAL//SBP",
                                              "numeric_value": 120 + i % 30}]}))
        paths.append(f"/v1/twins/{twins[i % len(twins)]}/events")
    (home / f"{name}_bodies.jsonl").write_text("\n".join(bodies))
    (home / f"{name}_paths.txt").write_text("\n".join(paths))
    return home / f"{name}_paths.txt", home / f"{name}_bodies.jsonl"


def bulk_timing(url: str, key: str, events, twins: list[int], new_base: int, runs: int
                ) -> dict:
    """1,000 twins x 20 events per request: events stored and forecast per second."""
    import httpx

    from tests.serving.test_service import api_events

    rng = np.random.default_rng()
    salt = int(time.time()) % 1_000_000  # new ids and event times each invocation (--keep)
    new_base += salt * 10_000
    out = {"new": [], "existing": []}
    headers = {"Authorization": f"Bearer {key}"}
    sample = events[events["code"].isin(["LAB//EGFR", "VITAL//SBP", "LAB//HBA1C"])]
    template = api_events(sample.head(20))
    with httpx.Client(timeout=300, headers=headers) as c:
        for r in range(runs):
            for kind in ("new", "existing"):
                if kind == "new":
                    ids = [new_base + r * 1000 + k for k in range(1000)]
                    evs = [template] * 1000
                else:
                    ids = [int(x) for x in rng.choice(twins, 1000, replace=False)]
                    evs = []
                    for k in range(1000):
                        base = np.datetime64("2015-01-01T00:00") + np.timedelta64(
                            salt * 60_000 % 4_000_000 + r * 1000 + k, "m")
                        evs.append([{"time": f"{base + np.timedelta64(j, 'h')}:00Z",
                                     "code": "VITAL//SBP", "numeric_value": 110.0 + j}
                                    for j in range(20)])
                body = {"twins": [{"subject_id": s, "events": e} for s, e in
                                  zip(ids, evs, strict=True)]}
                t0 = time.perf_counter()
                resp = c.post(f"{url}/v1/twins:bulk", json=body)
                wall = time.perf_counter() - t0
                assert resp.status_code == 200, resp.text[:500]
                got = resp.json()
                assert len(got["twins"]) == 1000 and all(t["forecast_id"] for t in got["twins"])
                out[kind].append(got["events_added"] / wall)
    return {k: statistics.median(v) for k, v in out.items()}


def cds_timing(url: str, private_key: str, issuer: str, n: int = 60) -> dict:
    """Sequential CDS Hooks calls, each a new patient with a few years of labs."""
    import httpx
    import jwt

    from tests.serving.test_cds import prefetch

    lat = []
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            pid = f"bench-{uuid.uuid4().hex[:12]}"
            pre = prefetch(pid)
            pre["patient"]["identifier"] = [{"system": "urn:bench", "value": pid}]
            target = f"{url}/cds-services/twincast-eskd"
            now = int(time.time())
            tok = jwt.encode({"iss": issuer, "aud": target, "exp": now + 300, "iat": now,
                              "jti": str(uuid.uuid4())}, private_key, algorithm="RS384")
            body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                    "context": {"patientId": pid}, "prefetch": pre}
            t0 = time.perf_counter()
            r = c.post(target, json=body, headers={"Authorization": f"Bearer {tok}"})
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    ms = np.array(lat)
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def promote_copy(home: Path) -> str:
    from training.registry import CHAMPION, model_name
    from training.tracking import Tracker

    reg = Tracker(f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri()).registry
    name = model_name("eskd")
    champ = reg.version_by_alias(name, CHAMPION)
    mv = reg.register(name, champ.source, champ.run_id, {"family": "copy"})
    reg.promote(name, str(mv.version), actor="bench", kind="manual", reason="bench",
                task_name="eskd")
    return str(mv.version)


def run_db(kind: str, home: Path, events, args) -> dict:
    from bench.serve_data import hot_twins, load_twins
    from features.events import EventArrays
    from serving.store import open_store
    from serving.store.twins import event_arrays
    from tests.serving.conftest import CDS_ISSUER, cds_keypair

    res: dict = {}
    keep = OUT / f"twins_{kind}_{args.twins}.url"
    if args.keep and keep.exists():
        db_url = keep.read_text()
        forget_forecasts(db_url)
        print(f"[{kind}] reusing the loaded store, every twin stale again", flush=True)
    else:
        db_url = (f"sqlite:///{OUT / f'twins_{kind}_{args.twins}.db'}" if kind == "sqlite"
                  else fresh_pg(f"twincast_bench_{args.twins}"))
        if kind == "sqlite":
            for f in OUT.glob(f"twins_{kind}_{args.twins}.db*"):
                f.unlink()
        print(f"[{kind}] loading {args.twins:,} twins ...", flush=True)
        print(f"  loaded in {load_twins(db_url, events):.0f}s", flush=True)
        keep.write_text(db_url)
    n, wall = refresh_in_process(home, db_url)
    res["refresh"] = (n, wall)
    print(f"  re-forecast of {n:,} twins: {wall:.1f}s ({n / wall:,.0f} twins/s)", flush=True)

    store = open_store(db_url)
    key = store.keys.create(f"bench-{uuid.uuid4().hex[:6]}", "clinical")
    store.dispose()
    hot = hot_twins(events)
    last = events.loc[events["subject_id"].isin(hot), "time"].max().to_datetime64()
    rng = random.Random(0)
    (home / "get_paths.txt").write_text("\n".join(f"/v1/twins/{rng.choice(hot)}"
                                                  for _ in range(10_000)))
    (home / "base_paths.txt").write_text("\n".join(f"/twin/{rng.choice(hot)}"
                                                   for _ in range(10_000)))
    (home / "predict.txt").write_text("/predict\n")
    scenario = json.dumps({"events": [{"code": "VITAL//SBP", "numeric_value": 125.0}]})
    whatif = [f"/v1/twins/{rng.choice(hot)}/what-if" for _ in range(10_000)]
    (home / "whatif_paths.txt").write_text("\n".join(whatif))
    (home / "whatif_bodies.txt").write_text("\n".join([scenario] * len(whatif)))
    cds_private, cds_public = cds_keypair()
    env = {**os.environ, "TWINCAST_HOME": str(home), "TWINCAST_TASK": "eskd",
           "TWINCAST_MLFLOW_URI": f"sqlite:///{home / 'mlflow.db'}",
           "TWINCAST_DATABASE_URL": db_url, "TWINCAST_WORKERS": "1",
           "TWINCAST_MODEL_POLL_SECONDS": "2", "BENTOML_HOME": str(home / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true",
           "TWINCAST_PUBLIC_URL": f"http://127.0.0.1:{PORT}",
           "TWINCAST_CDS_CLIENTS": json.dumps({CDS_ISSUER: {"public_key": cds_public,
                                                            "algorithms": ["RS384"]}})}
    auth = [f"Authorization: Bearer {key}", "content-type: application/json"]
    url = f"http://127.0.0.1:{PORT}"
    svc = start([str(BIN / "bentoml"), "serve", "twincast.service:Twincast", "--host",
                 "127.0.0.1", "--port", str(PORT)], env, f"{url}/v1/ready",
                home / f"service_{kind}.log")
    runs: dict = {}
    try:
        for r in range(args.runs):
            for c in (1, 16):
                runs.setdefault(("GET twin", c), []).append(
                    wrk(url, "GET", c, args.seconds, auth, home / "get_paths.txt"))
                p, b = bodies_for(home, f"post{r}{c}", hot,
                                  last + np.timedelta64((r * 2 + (c > 1)) * 60_000, "m"))
                runs.setdefault(("POST one event", c), []).append(
                    wrk(url, "POST", c, args.seconds, auth, p, b))
                runs.setdefault(("POST what-if", c), []).append(
                    wrk(url, "POST", c, args.seconds, auth, home / "whatif_paths.txt",
                        home / "whatif_bodies.txt"))
        for (name, c), rs in runs.items():
            m = median_of(rs)
            print(f"  {name} c={c}: p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, "
                  f"{m['rps']:.0f} req/s", flush=True)
        everyone = [int(x) for x in events["subject_id"].unique()]
        res["bulk"] = bulk_timing(url, key, events, everyone, 1_000_000_000, args.runs)
        print(f"  bulk: {res['bulk']}", flush=True)
        res["cds"] = cds_timing(url, cds_private, CDS_ISSUER)
        print(f"  cds: {res['cds']}", flush=True)
        # the one-event POST while the service re-forecasts every twin
        version = promote_copy(home)
        deadline = time.monotonic() + 60
        while _refresh_state(db_url, version) not in ("running", "done"):
            assert time.monotonic() < deadline, "the refresh did not start"
            time.sleep(0.1)
        p, b = bodies_for(home, "busy", hot, last + np.timedelta64(10 * 60_000, "m"))
        t_busy = time.monotonic()
        res["busy"] = wrk(url, "POST", 1, args.seconds, auth, p, b)
        res["busy_state"] = _refresh_state(db_url, version)
        while _refresh_state(db_url, version) != "done":
            time.sleep(0.5)
        res["service_refresh_s"] = time.monotonic() - t_busy
        print(f"  busy POST: {res['busy']}; service refresh {res['service_refresh_s']:.0f}s",
              flush=True)
    finally:
        svc.terminate()
        svc.wait(60)
    res["service"] = {k: median_of(v) for k, v in runs.items()}

    # baselines, same run, same core
    from serving.bootstrap import build_service

    svc_obj = build_service(config(home, db_url), start=False)
    model = svc_obj.models.sync_to(svc_obj.source.champion_version())
    with svc_obj.store.read() as s:
        h = svc_obj.store.twins.histories(s, [hot[0]])
    arrays: EventArrays = h.arrays if len(h.arrays) else event_arrays([])
    t_us = int(arrays.time_us.max())
    x = model.bundle.features_for(arrays, np.array([hot[0]]), np.array([t_us]))
    np.save(home / "row.npy", x[0])
    model.bundle.models[-1].booster_.save_model(str(home / "baseline.txt"))
    svc_obj.store.dispose()
    benv = {**os.environ, "BASELINE_MODEL": str(home / "baseline.txt"),
            "BASELINE_ROW": str(home / "row.npy"), "BASELINE_DB": db_url}
    base_url = f"http://127.0.0.1:{BASE_PORT}"
    base = start([str(BIN / "uvicorn"), "bench.baseline_app:app", "--host", "127.0.0.1",
                  "--port", str(BASE_PORT), "--log-level", "warning"], benv,
                 f"{base_url}/docs", home / f"baseline_{kind}.log")
    bruns: dict = {}
    try:
        for _ in range(args.runs):
            for c in (1, 16):
                bruns.setdefault(("bare FastAPI + LightGBM", c), []).append(
                    wrk(base_url, "POST", c, args.seconds, [], home / "predict.txt"))
                bruns.setdefault(("+ read row, commit access row", c), []).append(
                    wrk(base_url, "GET", c, args.seconds, [], home / "base_paths.txt"))
    finally:
        base.terminate()
        base.wait(30)
    res["baseline"] = {k: median_of(v) for k, v in bruns.items()}
    return res


def forget_forecasts(db_url: str) -> None:
    """A kept store as if freshly loaded: no served version, no twin forecast."""
    from sqlalchemy import text

    from serving.store import open_store

    store = open_store(db_url)
    with store.write() as s:
        s.execute(text("UPDATE twins SET model_version = NULL, model_name = NULL"))
        s.execute(text("DELETE FROM served_model"))
        s.execute(text("DELETE FROM refresh_jobs"))
    store.dispose()


def _refresh_state(db_url: str, version: str) -> str | None:
    from serving.store import open_store

    store = open_store(db_url, migrate=False)
    try:
        job = store.jobs.latest("twincast-eskd")
        return job.state if job is not None and job.model_version == version else None
    finally:
        store.dispose()


def report(kind: str, res: dict) -> None:
    base = res["baseline"]
    print(f"\n== {kind}: one worker; medians of the runs ==")
    # rps/db beside p50/db: a baseline whose writers starve one another on SQLite's busy
    # handler (p99 ~0.9 s at c=16) has a low median, not a higher throughput; at a fixed
    # concurrency the mean latency is concurrency / throughput (Little's law), so rps/db
    # is also the inverse of the mean latencies' ratio
    print(f"{'scenario':<36}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'errors':>7}"
          f"{'p50/bare':>10}{'p50/db':>8}{'rps/db':>8}{'rps/bare':>10}")
    rows = [*res["service"].items(), *base.items()]
    for (name, c), r in rows:
        bare, db = base[("bare FastAPI + LightGBM", c)], base[("+ read row, commit access row", c)]
        print(f"{name:<36}{c:>5}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['rps']:>8.0f}"
              f"{r['errors']:>7.0f}{r['p50_ms'] / bare['p50_ms']:>10.2f}"
              f"{r['p50_ms'] / db['p50_ms']:>8.2f}{r['rps'] / db['rps']:>8.2f}"
              f"{r['rps'] / bare['rps']:>10.2f}")
    for c in (1, 16):
        w, g = res["service"][("POST what-if", c)], res["service"][("GET twin", c)]
        print(f"what-if at concurrency {c}: p50 {w['p50_ms']:.2f} ms, "
              f"{w['p50_ms'] / g['p50_ms']:.1f}x a GET of the twin in the same run "
              f"({g['p50_ms']:.2f} ms)")
    n, wall = res["refresh"]
    print(f"re-forecast of {n:,} twins after a reload (in process): {wall:.1f}s "
          f"({n / wall:,.0f} twins/s)")
    busy, idle = res["busy"], res["service"][("POST one event", 1)]
    print(f"one-event POST while the service re-forecasts every twin ({res['busy_state']} "
          f"at the end): p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms "
          f"(idle p99 {idle['p99_ms']:.2f} ms: {busy['p99_ms'] / idle['p99_ms']:.1f}x); "
          f"the service's refresh took {res['service_refresh_s']:.0f}s from then")
    print(f"bulk, 1,000 twins x 20 events per request: {res['bulk']['new']:,.0f} events/s "
          f"(new twins), {res['bulk']['existing']:,.0f} events/s (existing twins), "
          "a stored forecast for every twin")
    print(f"CDS Hooks patient-view with prefetch, one at a time: p50 {res['cds']['p50']:.0f} "
          f"ms, p99 {res['cds']['p99']:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--twins", type=int, default=100_000)
    ap.add_argument("--seconds", type=int, default=10, help="per wrk run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="reuse the stores loaded last time")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("needs wrk (Debian: apt-get install wrk)")
    from bench.features_bench import cohort
    from bench.serve_data import train_model
    from features.events import read_events

    home = OUT / "serve_home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    events = read_events(cohort(OUT, args.twins))
    t0 = time.perf_counter()
    train_model(home, events)
    print(f"trained the served model in {time.perf_counter() - t0:.0f}s", flush=True)
    results = {kind: run_db(kind, home, events, args) for kind in args.db.split(",")}
    for kind, res in results.items():
        report(kind, res)


if __name__ == "__main__":
    main()
