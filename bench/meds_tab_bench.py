"""twincast beside MEDS-Tab, run here on the same cohort and the same prediction times.

    python bench/meds_tab_bench.py [--subjects 2000] [--workers 2] [--out bench/out]

MEDS-Tab (PyPI ``meds-tab``, the reference open tool for tabularising MEDS data) is a
benchmark baseline only, never a twincast dependency: it is installed into its own venv
under ``--out`` the first time (``meds-tab==0.2.0``).  Its tabularisation is run the way
its documentation describes — describe codes, static features, then the windowed
time-series features at the task's prediction times (``input_label_dir``), with its
joblib workers — over the task's windows (30d, 365d, full) and its aggregations
(present, code count, value count, sum, sum of squares, min, max) for codes seen at
least 20 times.  twincast's whole job on the same events (read, validate, label,
featurise with more aggregations, write parquet) runs in fresh processes (median of 3).
Both outputs have one row per prediction time; their per-row counts of the numeric
codes are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEDS_TAB = "meds-tab==0.2.0"
REPEATS = 3


def meds_tab_venv(path: Path) -> Path:
    bin_dir = path / "bin"
    if not (bin_dir / "meds-tab-tabularize-time-series").exists():
        print(f"  installing {MEDS_TAB} into {path} (benchmark baseline only)")
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", MEDS_TAB],
                       check=True)
    return bin_dir


def meds_tab_input(cohort: Path, dest: Path) -> tuple[int, int]:
    """MEDS-Tab's layout (data/<split>/0.parquet, labels/<split>/0.parquet) of the cohort."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.features_bench import TASK
    from features.events import EventArrays, read_events
    from features.labels import derive_labels, label_column
    from features.splits import assign_splits
    from features.task import load_task

    task = load_task(TASK)
    events = read_events(cohort)
    labels = derive_labels(EventArrays.from_events(events), task)
    subjects = events["subject_id"].unique()
    split_of = dict(zip(subjects, assign_splits(subjects, task.split), strict=True))
    horizon = label_column(max(task.horizons_days))
    for split in ("train", "tuning", "held_out"):
        ev = events[events["subject_id"].map(split_of) == split]
        lab = labels[labels["subject_id"].map(split_of) == split]
        for kind, frame in (
            ("data", pd.DataFrame({"subject_id": ev["subject_id"].to_numpy(),
                                   "time": ev["time"].to_numpy(),
                                   "code": ev["code"].astype(str).to_numpy(),
                                   "numeric_value": ev["numeric_value"].to_numpy("float32")})),
            ("labels", pd.DataFrame({"subject_id": lab["subject_id"].to_numpy(),
                                     "prediction_time": lab["prediction_time"].to_numpy(),
                                     "boolean_value": lab[horizon].to_numpy() == 1})),
        ):
            (dest / kind / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False),
                           dest / kind / split / "0.parquet")
    return len(events), len(labels)


def run_meds_tab(bin_dir: Path, src: Path, out: Path, workers: int) -> dict[str, float]:
    common = [f"input_dir={src / 'data'}", f"output_dir={out}",
              f"input_label_dir={src / 'labels'}",
              "tabularization.window_sizes=[30d,365d,full]",
              "tabularization.aggs=[static/present,code/count,value/count,value/sum,"
              "value/sum_sqd,value/min,value/max]",
              "tabularization.min_code_inclusion_count=20"]
    steps = {
        "describe": ["meds-tab-describe", f"input_dir={src / 'data'}", f"output_dir={out}"],
        "static": ["meds-tab-tabularize-static", *common],
        "time-series": ["meds-tab-tabularize-time-series", "--multirun",
                        f"worker=range(0,{workers})", "hydra/launcher=joblib", *common],
    }
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    times = {}
    for name, (cmd, *args) in steps.items():
        t0 = time.perf_counter()
        done = subprocess.run([str(bin_dir / cmd), *args], capture_output=True, text=True,
                              env=env)
        times[name] = time.perf_counter() - t0
        if done.returncode:
            sys.exit(f"MEDS-Tab {name} failed:\n{done.stderr[-3000:]}")
    return times


def code_counts_per_row(bin_dir: Path, out: Path, codes: list[str]) -> list[float]:
    """Row sums of MEDS-Tab's full-history counts of ``codes``, splits in our order.

    Its code counts, not its value counts: in meds-tab 0.2.0 every value aggregation comes
    out empty, as ``get_long_value_df`` filters codes against feature *names*
    (``LAB//EGFR/value``), which no code equals.
    """
    code = (
        "import json; from MEDS_tabular_automl.utils import load_matrix, get_feature_names;"
        "from MEDS_tabular_automl.describe_codes import get_feature_columns;"
        "names = get_feature_names('code/count', "
        f"get_feature_columns('{out}/metadata/codes.parquet'));"
        f"keep = [i for i, n in enumerate(names) if n.rsplit('/', 1)[0] in {codes!r}];"
        "print(json.dumps([x for s in ('train', 'tuning', 'held_out') for x in load_matrix("
        f"'{out}/tabularize/' + s + '/0/full/code/count.npz')"
        ".toarray()[:, keep].sum(1).tolist()]))")
    done = subprocess.run([str(bin_dir / "python"), "-c", code], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


def twincast_counts(cohort: Path) -> tuple[list[str], list[float]]:
    """twincast's numeric codes and each row's full-history count of them, splits in order."""
    from bench.features_bench import TASK
    from features.events import open_meds
    from features.pipeline import build_training_frame
    from features.task import load_task

    frame, spec = build_training_frame(open_meds(cohort), load_task(TASK))
    codes = [c.code for c in spec.codes if c.kind == "numeric"]
    cols = [spec.feature_name(c, "all", "count") for c in codes]
    order = {"train": 0, "tuning": 1, "held_out": 2}
    frame = frame.assign(o=frame["split"].astype(str).map(order)).sort_values(
        ["o", "subject_id", "prediction_time"], kind="stable")
    return codes, frame[cols].sum(axis=1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=2_000)
    ap.add_argument("--workers", type=int, default=2, help="MEDS-Tab's joblib workers")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    import shutil
    import tempfile

    from bench.features_bench import cohort

    args.out.mkdir(parents=True, exist_ok=True)
    bin_dir = meds_tab_venv(args.out / "meds-tab-venv")
    path = cohort(args.out, args.subjects)
    work = Path(tempfile.mkdtemp(prefix="meds-tab-", dir=args.out))
    try:
        n_events, n_rows = meds_tab_input(path, work / "input")
        print(f"{args.subjects:,} subjects: {n_events:,} events, {n_rows:,} prediction times")
        steps = run_meds_tab(bin_dir, work / "input", work / "output", args.workers)
        mt_s = sum(steps.values())
        codes, ours = twincast_counts(path)
        mt_counts = code_counts_per_row(bin_dir, work / "output", codes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    walls = []
    for _ in range(REPEATS):
        child = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "features_bench.py"), "--child", str(path),
             str(args.out / f"train_{args.subjects}.parquet")],
            check=True, capture_output=True, text=True, env=env)
        walls.append(json.loads(child.stdout.strip().splitlines()[-1])["wall_s"])
    tc_s = sorted(walls)[len(walls) // 2]
    same = sum(a == b for a, b in zip(ours, mt_counts, strict=True))
    detail = ", ".join(f"{k} {v:.1f}s" for k, v in steps.items())
    print(f"  MEDS-Tab ({args.workers} workers): {mt_s:.1f}s ({detail}) = "
          f"{n_events / mt_s:,.0f} events/s")
    print(f"  twincast end to end (read, label, featurise, write), median of {REPEATS}: "
          f"{tc_s:.2f}s = {n_events / tc_s:,.0f} events/s")
    print(f"  twincast is {mt_s / tc_s:,.0f}x faster on the same events and prediction times "
          f"(rows: MEDS-Tab {len(mt_counts):,}, twincast {len(ours):,})")
    print(f"  full-history counts of the numeric codes agree on {same:,} of {len(ours):,} rows; "
          f"MEDS-Tab counts {sum(ours) - sum(mt_counts):,.0f} fewer events (twincast's counts "
          "are tested against a slow reference), and its value aggregations come out empty")


if __name__ == "__main__":
    main()
