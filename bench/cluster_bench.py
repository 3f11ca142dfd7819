"""Dask benchmark (not a timed test): a sharded cohort featurised, scored and trained
on a LocalCluster beside the single-process path, in one run, as ratios.

    python bench/cluster_bench.py [--subjects 1000000] [--shards 100] [--workers 2]
                                  [--train-subjects 100000] [--out bench/out/cluster]

1. ``twincast simulate --subjects N --shards K`` once (cached in ``--out``).
2. Features: the single-process ``write_training_set`` in a fresh process (wall time,
   events/s, peak RSS) beside ``write_training_set_on`` on a LocalCluster of
   ``--workers`` processes (wall time, events/s, each worker's peak RSS, the client's);
   the two outputs are compared row for row.  Each shard task's own time is read from
   the scheduler's task stream, which is what the projection below scales.
3. Training on a smaller cohort (``--train-subjects``, its own shards), one process
   against the cluster: wall time and peak memory per worker, held-out AUROC of both.
4. A projection of a 100-worker cluster on 100 million subjects from the measured
   per-shard costs (printed; the README's scaling section quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASK = ROOT / "examples" / "tasks" / "eskd.yaml"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def cohort(out: Path, n: int, shards: int) -> Path:
    path = out / f"cohort_{n}_{shards}"
    if not (path / "data").exists():
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "twincast"), "simulate",
                        "--subjects", str(n), "--shards", str(shards), "--out", str(path),
                        "--overwrite"], check=True)
        print(f"  simulated {n:,} subjects in {shards} shards in "
              f"{time.perf_counter() - t0:.0f}s")
    return path


SINGLE = """
import json, resource, sys, time
from features.events import open_meds
from features.pipeline import write_training_set
from features.task import load_task
t0 = time.perf_counter()
s = write_training_set(open_meds(sys.argv[1]), load_task(sys.argv[2]), sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - t0, "events": s.events, "rows": s.rows,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_features(meds: Path, out: Path, workers: int) -> dict:
    from features.cluster import Scheduler, connect
    from features.events import open_meds
    from features.sharded import write_training_set_on
    from features.task import load_task

    one = out / "features_single.parquet"
    proc = subprocess.run([sys.executable, "-c", SINGLE, str(meds), str(TASK), str(one)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"the single-process run failed:\n{proc.stderr[-3000:]}")
    single = json.loads(proc.stdout.strip().splitlines()[-1])
    dist_out = out / "features_cluster"  # a folder of parts: no serial copy
    with connect(Scheduler.parse(f"local:{workers}")) as client:
        from distributed import get_task_stream

        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            s = write_training_set_on(client, open_meds(meds), load_task(TASK), dist_out)
            seconds = time.perf_counter() - t0
        stats = [t for t in ts.data if str(t["key"]).startswith("shard_rows")]
        per_shard = [sum(x["stop"] - x["start"] for x in t["startstops"]
                         if x["action"] == "compute") for t in stats]
        p1 = [sum(x["stop"] - x["start"] for x in t["startstops"] if x["action"] == "compute")
              for t in ts.data if str(t["key"]).startswith("shard_stats")]
        worker_mb = sorted(client.run(peak_mb).values())
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    a = pq.ParquetFile(one)  # a row group at a time, the parts in name order
    b = [(f, g) for f in map(pq.ParquetFile, sorted(dist_out.glob("*.parquet")))
         for g in range(f.num_row_groups)]
    same = a.num_row_groups == len(b) and all(
        a.read_row_group(g).equals(f.read_row_group(k)) for g, (f, k) in enumerate(b))
    compare = time.perf_counter() - t0
    out_mb = sum(p.stat().st_size for p in dist_out.glob("*.parquet")) / 2**20
    t0 = time.perf_counter()
    from features.sharded import concat_parts

    concat_parts([str(p) for p in sorted(dist_out.glob("*.parquet"))],
                 str(out / "features_concat.parquet"))
    concat_s = time.perf_counter() - t0
    one.unlink()
    (out / "features_concat.parquet").unlink()
    import shutil

    shutil.rmtree(dist_out)
    return {"single": single, "cluster": {"seconds": seconds, "events": s.events,
                                          "rows": s.rows, "worker_peak_mb": worker_mb,
                                          "client_peak_mb": peak_mb(),
                                          "pass1_shard_s": statistics.median(p1),
                                          "pass2_shard_s": statistics.median(per_shard),
                                          "output_mb": out_mb, "concat_s": concat_s},
            "identical": same, "compare_s": compare}


TRAIN = """
import json, resource, sys, time
from features.task import load_task
from training.tracking import Tracker
from training.train import TrainOptions, train
t0 = time.perf_counter()
r = train(sys.argv[1], load_task(sys.argv[2]), Tracker(sys.argv[3], sys.argv[4]),
          TrainOptions(trials=1, n_bootstrap=20, families=["lightgbm"], seed=0),
          log=lambda m: None)
auroc = r.candidates["lightgbm"].report["horizons"]["730"]["rows"]["auroc"]["estimate"]
print(json.dumps({"seconds": time.perf_counter() - t0, "auroc_730": auroc,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_training(meds: Path, out: Path, workers: int, rounds: int) -> dict:
    from features.cluster import Scheduler, connect
    from features.task import load_task
    from training.tracking import Tracker
    from training.train import TrainOptions, train

    a = out / "mlflow_single"
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(meds), str(TASK),
                           f"sqlite:///{a}.db", (out / "art_single").resolve().as_uri()],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    single = json.loads(proc.stdout.strip().splitlines()[-1])
    tracker = Tracker(f"sqlite:///{out / 'mlflow_cluster'}.db",
                      (out / "art_cluster").resolve().as_uri())
    with connect(Scheduler.parse(f"local:{workers}")) as client:
        t0 = time.perf_counter()
        r = train(meds, load_task(TASK), tracker,
                  TrainOptions(trials=1, n_bootstrap=20, families=["lightgbm"], seed=0,
                               cluster_rounds=rounds), log=lambda m: None, client=client)
        seconds = time.perf_counter() - t0
        worker_mb = sorted(client.run(peak_mb).values())
    auroc = r.candidates["lightgbm"].report["horizons"]["730"]["rows"]["auroc"]["estimate"]
    return {"single": single, "cluster": {"seconds": seconds, "auroc_730": auroc,
                                          "worker_peak_mb": worker_mb,
                                          "client_peak_mb": peak_mb()}}


def projection(f: dict, subjects: int, shards: int) -> str:
    """100 workers, 100 million subjects, shards of the size measured here."""
    per_shard_subjects = subjects / shards
    target_shards = 100_000_000 / per_shard_subjects
    c = f["cluster"]
    work = (c["pass1_shard_s"] + c["pass2_shard_s"]) * target_shards / 100
    out_gib = c["output_mb"] * 100_000_000 / subjects / 1024
    concat_min = c["concat_s"] / c["output_mb"] * out_gib * 1024 / 60
    return (f"projection, 100 workers × 100,000,000 subjects in {target_shards:,.0f} shards "
            f"of {per_shard_subjects:,.0f}: {work / 60:,.1f} min of shard work a worker "
            f"(pass 1 {c['pass1_shard_s']:.2f} s + pass 2 {c['pass2_shard_s']:.2f} s a "
            f"shard, measured), writing a folder of ~{out_gib:,.0f} GiB of parts; one "
            f".parquet file instead adds a serial copy of {concat_min:,.0f} min at the "
            f"{c['concat_s']:.0f} s per {c['output_mb']:,.0f} MiB measured; memory per "
            f"worker stays one shard's ({max(c['worker_peak_mb']):,.0f} MB here)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train-subjects", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cluster")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    meds = cohort(args.out, args.subjects, args.shards)
    f = bench_features(meds, args.out, args.workers)
    s, c = f["single"], f["cluster"]
    print(f"features, {c['events']:,} events, {c['rows']:,} rows:")
    print(f"  one process  {s['seconds']:7.1f} s  {s['events'] / s['seconds']:>10,.0f} "
          f"events/s  peak {s['peak_mb']:,.0f} MB")
    print(f"  local:{args.workers}      {c['seconds']:7.1f} s  "
          f"{c['events'] / c['seconds']:>10,.0f} events/s  peak per worker "
          f"{', '.join(f'{m:,.0f}' for m in c['worker_peak_mb'])} MB, client "
          f"{c['client_peak_mb']:,.0f} MB")
    print(f"  cluster / one process: {c['seconds'] / s['seconds']:.2f}x the time; "
          f"identical output: {f['identical']}")
    print(f"  per shard (median): pass 1 {c['pass1_shard_s']:.2f} s, pass 2 "
          f"{c['pass2_shard_s']:.2f} s; output {c['output_mb']:,.0f} MiB")
    print("  " + projection(f, args.subjects, args.shards))
    result = {"features": f}
    if not args.skip_training:
        tm = cohort(args.out, args.train_subjects, max(2, args.train_subjects // 10_000))
        t = bench_training(tm, args.out, args.workers, args.rounds)
        ts, tc = t["single"], t["cluster"]
        print(f"training (lightgbm, 1 trial) on {args.train_subjects:,} subjects:")
        print(f"  one process  {ts['seconds']:7.1f} s  peak {ts['peak_mb']:,.0f} MB  "
              f"AUROC 730 d {ts['auroc_730']:.4f}")
        print(f"  local:{args.workers}      {tc['seconds']:7.1f} s  peak per worker "
              f"{', '.join(f'{m:,.0f}' for m in tc['worker_peak_mb'])} MB, client "
              f"{tc['client_peak_mb']:,.0f} MB  AUROC 730 d {tc['auroc_730']:.4f}")
        print(f"  cluster / one process: {tc['seconds'] / ts['seconds']:.2f}x the time")
        result["training"] = t
    (args.out / "cluster_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
