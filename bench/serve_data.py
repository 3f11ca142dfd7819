"""Data for the serving benchmark: a served model, and a twin store filled fast.

The store is filled by plain bulk inserts (``COPY`` on PostgreSQL), with the same rows
the service writes (idempotency keys by the store's own function); the twins carry no
forecast yet, so the service's refresh is what forecasts them — and is timed.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def train_model(home: Path, events: pd.DataFrame, subjects: int = 5000) -> None:
    """A LightGBM model on the first ``subjects`` subjects, promoted champion."""
    from features.events import write_meds
    from features.simulate import CODES
    from features.task import load_task
    from training.tracking import Tracker
    from training.train import TrainOptions, train

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    small = home / "train_cohort"
    write_meds(events[events["subject_id"] < subjects], small, codes=CODES, overwrite=True)
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri())
    train(small, load_task(ROOT / "examples" / "tasks" / "eskd.yaml"), tracker,
          TrainOptions(trials=2, n_bootstrap=20, families=["lightgbm"]), log=lambda m: None)


def load_twins(url: str, events: pd.DataFrame) -> float:
    """Twins and their events into a fresh store; returns seconds taken."""
    from serving.store import open_store
    from serving.store.twins import idempotency_key, utcnow

    t0 = time.perf_counter()
    store = open_store(url)
    now = utcnow()
    sid = events["subject_id"].to_numpy(np.int64)
    times = events["time"].to_numpy()
    tlist = [None if np.isnat(t) else pd.Timestamp(t).to_pydatetime() for t in times]
    codes = events["code"].astype(str).tolist()
    vals = [None if v != v else float(v) for v in events["numeric_value"].to_numpy(np.float64)]
    keys = [idempotency_key(int(s), t, c, v, None, None)
            for s, t, c, v in zip(sid.tolist(), tlist, codes, vals, strict=True)]
    g = events.groupby("subject_id")
    last, n = g["time"].max(), g.size()
    twins = [(int(k), now, now, None if pd.isna(last[k]) else last[k].to_pydatetime(),
              int(n[k])) for k in n.index]
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        if store.sqlite:
            cur.executemany("INSERT INTO twins (subject_id, created_at, updated_at, "
                            "last_event_time, event_count) VALUES (?, ?, ?, ?, ?)",
                            [(a, b.isoformat(" "), c.isoformat(" "),
                              None if d is None else d.isoformat(" "), e)
                             for a, b, c, d, e in twins])
            cur.executemany(
                "INSERT INTO events (subject_id, time, code, numeric_value, text_value, "
                "recorded_at, idempotency_key, source) VALUES (?, ?, ?, ?, NULL, ?, ?, 'bench')",
                [(s, None if t is None else t.strftime("%Y-%m-%d %H:%M:%S.%f"), c, v,
                  now.strftime("%Y-%m-%d %H:%M:%S.%f"), k)
                 for s, t, c, v, k in zip(sid.tolist(), tlist, codes, vals, keys, strict=True)])
        else:
            with cur.copy("COPY twins (subject_id, created_at, updated_at, last_event_time, "
                          "event_count) FROM STDIN") as cp:
                for row in twins:
                    cp.write_row(row)
            buf, null, rec = io.StringIO(), "\\N", now.isoformat(" ")
            for s, t, c, v, k in zip(sid.tolist(), tlist, codes, vals, keys, strict=True):
                ts = null if t is None else t.isoformat(" ")
                vs = null if v is None else repr(v)
                buf.write(f"{s}\t{ts}\t{c}\t{vs}\t{rec}\t{k}\tbench\n")
            buf.seek(0)
            with cur.copy("COPY events (subject_id, time, code, numeric_value, recorded_at, "
                          "idempotency_key, source) FROM STDIN") as cp:
                while chunk := buf.read(1 << 20):
                    cp.write(chunk)
        raw.commit()
    finally:
        raw.close()
    store.db.analyze()
    store.dispose()
    return time.perf_counter() - t0


def hot_twins(events: pd.DataFrame, target: int = 150, k: int = 500) -> list[int]:
    """Alive twins whose histories are closest to ``target`` events."""
    done = set(events.loc[events["code"].isin(["DX//ESKD", "MEDS_DEATH"]), "subject_id"])
    n = events.groupby("subject_id").size()
    n = n[~n.index.isin(list(done))]
    return [int(s) for s in (n - target).abs().sort_values(kind="stable").index[:k]]
