"""Shared factories: small real data (the synthetic cohort, the PBC data) for every test."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parents[1]
PBC_MEDS = ROOT / "examples" / "pbc" / "meds"
PBC_TASK = ROOT / "examples" / "pbc" / "task.yaml"
ESKD_TASK = ROOT / "examples" / "tasks" / "eskd.yaml"


@pytest.fixture(scope="session")
def small_cohort() -> pd.DataFrame:
    """400 synthetic CKD patients (canonical MEDS events)."""
    from features.simulate import simulate_cohort

    return simulate_cohort(400, seed=7)


@pytest.fixture(scope="session")
def small_cohort_dir(tmp_path_factory, small_cohort) -> Path:
    from features.events import write_meds
    from features.simulate import CODES

    return write_meds(small_cohort, tmp_path_factory.mktemp("cohort") / "meds", codes=CODES,
                      shard_subjects=150)


@pytest.fixture(scope="session")
def eskd_task():
    from features.task import load_task

    return load_task(ESKD_TASK)


@pytest.fixture(scope="session")
def pbc_task():
    from features.task import load_task

    return load_task(PBC_TASK)


def make_events(rows: list[tuple]) -> pd.DataFrame:
    """Canonical events from (subject_id, time or None, code, value or None) tuples."""
    from features.events import events_from_frame

    frame = pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], dtype=np.int64),
            "time": pd.to_datetime([r[1] for r in rows]).astype("datetime64[us]"),
            "code": [r[2] for r in rows],
            "numeric_value": np.array([np.nan if r[3] is None else r[3] for r in rows],
                                      dtype=np.float64),
        }
    )
    return events_from_frame(frame, source="test")


def by_remainder_split(subject_ids: np.ndarray) -> np.ndarray:
    """A split by subject that is not twincast's hash (15% held out, 15% tuning)."""
    r = np.asarray(subject_ids) % 20
    return np.select([r < 3, r < 6], ["held_out", "tuning"], "train").astype(object)


def aces_labels(events: pd.DataFrame, task, horizon: int) -> pd.DataFrame:
    """Labels as ACES would write them for ``task`` at ``horizon``: the task's own rules,
    censored rows left out, ``boolean_value`` per (subject, prediction time), and a split
    by subject (:func:`by_remainder_split`)."""
    from features.events import EventArrays
    from features.labels import derive_labels, label_column

    lab = derive_labels(EventArrays.from_events(events), task)
    lab = lab[lab[label_column(horizon)].notna()]
    return pd.DataFrame({"subject_id": lab["subject_id"].to_numpy(np.int64),
                         "prediction_time": lab["prediction_time"].to_numpy(),
                         "boolean_value": lab[label_column(horizon)].to_numpy() == 1,
                         "split": by_remainder_split(lab["subject_id"].to_numpy())})


def write_aces_labels(rows: pd.DataFrame, out: Path, *, shards: int = 2) -> Path:
    """An ACES-style label directory: ``<split>/<shard>.parquet`` (subjects dealt to
    shards), in the MEDS label schema (the value columns ACES leaves empty included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, part in rows.groupby("split"):
        (out / split).mkdir(parents=True, exist_ok=True)
        shard = part["subject_id"].to_numpy() % shards
        for k in range(shards):
            p = part[shard == k]
            n = len(p)
            pq.write_table(pa.table({
                "subject_id": pa.array(p["subject_id"].to_numpy(), pa.int64()),
                "prediction_time": pa.array(p["prediction_time"].to_numpy(), pa.timestamp("us")),
                "boolean_value": pa.array(p["boolean_value"].to_numpy(), pa.bool_()),
                "integer_value": pa.nulls(n, pa.int64()),
                "float_value": pa.nulls(n, pa.float64()),
                "categorical_value": pa.nulls(n, pa.string()),
            }), out / split / f"{k}.parquet")
    return out


# ------------------------------------------------------------------ one tiny trained model

TINY_OPTIONS = {"trials": 2, "n_bootstrap": 30, "min_subgroup": 30, "seed": 0}


@pytest.fixture(scope="session")
def tiny_task(eskd_task):
    """The ESKD task with limits loose enough for a 400-subject cohort."""
    from features.task import parse_task

    data = eskd_task.model_dump(mode="json")
    data["promotion"].update({"max_ece": 0.2, "calibration_slope": [0.2, 5.0]})
    for t in data.get("trajectories", []):
        t["max_coverage_error"] = 0.2  # a 400-subject cohort's coverage is noisy
    data["what_if"] = {"allowed_codes": ["RX//ACEI"]}  # a treatment open to clinicians
    return parse_task(data)


@pytest.fixture(scope="session")
def mlflow_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def tracker(mlflow_home):
    from training.tracking import Tracker

    return Tracker(f"sqlite:///{mlflow_home / 'mlflow.db'}", (mlflow_home / "art").as_uri())


@pytest.fixture(scope="session")
def trained(small_cohort_dir, tiny_task, tracker):
    """One tiny model trained once per test session; it becomes the first champion."""
    from training.train import TrainOptions, train

    return train(small_cohort_dir, tiny_task, tracker, TrainOptions(**TINY_OPTIONS),
                 log=lambda m: None)


# ------------------------------------------------------------------ real servers

PG_ADMIN_URL = os.environ.get("TWINCAST_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "twincast_test"):
    """A fresh PostgreSQL database, dropped afterwards; under CI=true an unreachable
    server fails the test instead of skipping it."""
    import uuid

    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is unreachable at {PG_ADMIN_URL} under CI=true: {exc}")
        pytest.skip(f"PostgreSQL is unreachable at {PG_ADMIN_URL}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_database():
    with fresh_pg_database() as url:
        yield url


def stop(proc) -> None:
    """Terminate a server process started by a test, killing it if it hangs."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def dask_cluster(workers: int = 2, log_dir: Path | None = None):
    """A real ``dask scheduler`` and ``workers`` ``dask worker`` processes (one thread
    each, with their nannies) on loopback, started as an operator would; yields the
    scheduler's address."""
    import subprocess
    import sys
    import time

    dask = str(Path(sys.executable).parent / "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = []

    def start(*args: str):
        log = (open(log_dir / f"dask-{len(logs)}.log", "w") if log_dir  # noqa: SIM115
               else subprocess.DEVNULL)
        logs.append(log)
        return subprocess.Popen([dask, *args], stdout=log, stderr=subprocess.STDOUT)

    procs = [start("scheduler", "--host", "127.0.0.1", "--port", str(port),
                   "--no-dashboard")]
    try:
        procs += [start("worker", address, "--nthreads", "1", "--nworkers", "1",
                        "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "0",
                        "--name", f"w{i}") for i in range(workers)]
        from distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            if log is not subprocess.DEVNULL:
                log.close()
