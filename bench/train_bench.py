"""Training benchmark (not a timed test): wall time and peak memory of a whole training
job (features → search → calibration → evaluation → MLflow → gate) at 20,000 and 100,000
synthetic subjects, and the held-out metrics table of every candidate.

    python bench/train_bench.py [--sizes 20000 100000] [--trials 8] [--bootstrap 200]

Each size runs in a fresh process with its own MLflow store under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def child(events: str, task: str, store: str, trials: int, bootstrap: int) -> None:
    import logging
    import warnings

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from features.task import load_task
    from training.tracking import Tracker
    from training.train import TrainOptions, train

    store_dir = Path(store)
    store_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"sqlite:///{store_dir / 'mlflow.db'}", (store_dir / "art").as_uri())
    t0 = time.perf_counter()
    result = train(events, load_task(task), tracker,
                   TrainOptions(trials=trials, n_bootstrap=bootstrap), log=lambda m: None)
    wall = time.perf_counter() - t0
    table = {f: c.report for f, c in result.candidates.items()}
    print(json.dumps({"wall_s": wall, "peak_rss": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "best": result.best, "reason": result.reason,
        "reports": table}))


def fmt(ci: dict) -> str:
    return f"{ci['estimate']:.3f} ({ci['lower']:.3f}-{ci['upper']:.3f})"


def show(name: str, r: dict) -> None:
    print(f"{name}: training job {r['wall_s']:.1f}s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB; "
          f"best {r['best']}; gate: {r['reason']}")
    print("  candidate  horizon weighting  AUROC  AUPRC  Brier  CITL  slope  ECE  Uno's C")
    for fam, rep in r["reports"].items():
        for h, e in rep["horizons"].items():
            for w in ("rows", "patients"):
                m = e[w]
                print(f"  {fam:10} {h:>5}d {w:9} " + "  ".join(fmt(m[k]) for k in (
                    "auroc", "auprc", "brier", "citl", "calibration_slope", "ece", "uno_c")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--pbc", action="store_true", help="also train on the shipped PBC data")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]), int(args.child[4]))
        return
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for n in args.sizes:
        from bench.features_bench import cohort

        jobs.append((f"synthetic {n:,}", str(cohort(out, n)),
                     str(ROOT / "examples" / "tasks" / "eskd.yaml")))
    if args.pbc:
        jobs.append(("PBC (312 patients)", str(ROOT / "examples" / "pbc" / "meds"),
                     str(ROOT / "examples" / "pbc" / "task.yaml")))
    for name, events, task in jobs:
        store = out / f"mlflow_{name.split()[0]}_{abs(hash(events)) % 10_000}"
        subprocess.run(["rm", "-rf", str(store)], check=True)
        proc = subprocess.run([sys.executable, __file__, "--child", events, task, str(store),
                               str(args.trials), str(args.bootstrap)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(proc.returncode)
        show(name, json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
