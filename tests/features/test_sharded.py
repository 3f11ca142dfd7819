"""Training sets on a real Dask cluster equal the single-process ones, row for row and
bit for bit, also when a worker is killed in the middle."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from features.cluster import Scheduler, SchedulerError, connect, from_environment
from features.events import open_meds, write_meds
from features.pipeline import write_training_set
from features.sharded import write_training_set_on
from features.simulate import CODES, simulate_cohort
from features.task import load_task
from tests.conftest import ESKD_TASK, ROOT, dask_cluster

TRAJECTORY_TASK = ROOT / "examples" / "tasks" / "eskd_trajectory.yaml"

BIN = Path(sys.executable).parent / "twincast"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """900 synthetic patients in 9 shards."""
    return write_meds(simulate_cohort(900, seed=11), tmp_path_factory.mktemp("s") / "meds",
                      codes=CODES, shard_subjects=100)


@pytest.fixture(scope="module")
def kalman_task():
    """The CKD task with the trajectory features (the Kalman noise is summed over
    shards: the spec must still be the single process's to the last bit)."""
    task = load_task(TRAJECTORY_TASK)
    traj = task.features.trajectory
    assert traj is not None and traj.kalman, "the example task uses the Kalman filter"
    return task


@pytest.fixture(scope="module")
def single(sharded, kalman_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "train.parquet"
    summary = write_training_set(open_meds(sharded), kalman_task, out, chunk_subjects=40)
    return out, summary


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scheduler_option_is_parsed_strictly(monkeypatch):
    assert Scheduler.parse("local") == Scheduler(None, None)
    assert Scheduler.parse("local:3") == Scheduler(None, 3)
    assert Scheduler.parse("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert Scheduler.parse("tls://sched.example:8786").address == "tls://sched.example:8786"
    for bad in ("local:0", "local:x", "http://h:1", "tcp://h", "tcp://h:1/x", ""):
        with pytest.raises(SchedulerError):
            Scheduler.parse(bad)
    monkeypatch.setenv("TWINCAST_DASK_SCHEDULER", "local:2")
    assert from_environment(None) == Scheduler(None, 2)
    assert from_environment("local:1") == Scheduler(None, 1)  # the option wins
    monkeypatch.delenv("TWINCAST_DASK_SCHEDULER")
    assert from_environment(None) is None


def test_local_cluster_gives_the_single_process_training_set(sharded, kalman_task, single,
                                                             tmp_path):
    one, summary = single
    out = tmp_path / "train.parquet"
    with connect(Scheduler.parse("local:2")) as client:
        dist = write_training_set_on(client, open_meds(sharded), kalman_task, out,
                                     chunk_subjects=40)
    assert dist.spec.digest() == summary.spec.digest()
    assert dist.spec == summary.spec
    assert dist.as_dict() == summary.as_dict()
    a, b = pq.read_table(one), pq.read_table(out)
    assert a.num_rows == summary.rows > 0
    assert a.equals(b)  # same rows, same order, same values and types
    assert digest(out) == digest(one)  # and the same bytes
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]  # no parts left


def test_dask_scheduler_and_workers_through_the_cli(sharded, single, tmp_path):
    one, _ = single
    out = tmp_path / "train.parquet"
    with dask_cluster(2) as address:
        proc = subprocess.run([str(BIN), "features", "--events", str(sharded), "--task",
                               str(TRAJECTORY_TASK), "--out", str(out), "--scheduler", address],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the CLI's chunks are larger: the row groups differ, the rows do not
    assert pq.read_table(one).equals(pq.read_table(out))


def test_a_worker_killed_while_featurising_changes_nothing(sharded, kalman_task, single,
                                                           tmp_path):
    one, summary = single
    out = tmp_path / "train.parquet"
    shards = len(open_meds(sharded).files)
    with dask_cluster(2) as address, connect(Scheduler.parse(address)) as client:
        before = set(client.run(os.getpid).values())
        seen = []

        def progress(n: int) -> None:
            seen.append(n)
            if len(seen) == shards + 1:  # the first shard of pass 2 is back: kill a worker
                busy = client.processing()
                victim = next(w for w, tasks in busy.items() if tasks)
                os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)

        dist = write_training_set_on(client, open_meds(sharded), kalman_task, out,
                                     progress=progress, chunk_subjects=40)
        client.wait_for_workers(2, timeout=60)  # the nanny brought the worker back
        after = set(client.run(os.getpid).values())
    assert len(before - after) == 1  # one worker process really died
    assert dist.as_dict() == summary.as_dict()
    assert digest(out) == digest(one)


def test_split_folders_empty_shards_and_label_files_on_a_cluster(small_cohort, eskd_task,
                                                                  tmp_path):
    """A MEDS directory laid out as data/train|tuning|held_out (one shard empty of
    events a task can use), and a task whose labels come from an ACES directory: the
    cluster's training sets are the single process's, byte for byte."""
    import pandas as pd

    from features.events import events_to_table, meds_directory
    from features.task import parse_task
    from tests.conftest import aces_labels, write_aces_labels

    ids = small_cohort["subject_id"].to_numpy()
    with meds_directory(tmp_path / "meds") as d:
        for split, lo, hi in (("train", 0, 250), ("tuning", 250, 330), ("held_out", 330, 400)):
            (d / "data" / split).mkdir()
            chunk = small_cohort[(ids >= ids.min() + lo) & (ids < ids.min() + hi)]
            for k, part in enumerate((chunk.iloc[:0], chunk) if split == "tuning" else (chunk,)):
                pq.write_table(events_to_table(part), d / "data" / split / f"{k}.parquet")
    given = aces_labels(small_cohort, eskd_task, 365)
    write_aces_labels(given, tmp_path / "labels")
    data = eskd_task.model_dump(mode="json")
    data.update(horizons_days=[365], labels={"path": str(tmp_path / "labels")},
                promotion={"primary_metric": "auroc"})
    data["alerts"]["thresholds"] = [t for t in data["alerts"]["thresholds"]
                                    if t["horizon_days"] == 365]
    dataset = open_meds(tmp_path / "meds")
    assert dataset.file_splits and len(dataset.files) == 4
    with connect(Scheduler.parse("local:2")) as client:
        for name, task in (("derived", eskd_task), ("labels", parse_task(data))):
            one, two = tmp_path / f"{name}1.parquet", tmp_path / f"{name}2.parquet"
            a = write_training_set(dataset, task, one)
            b = write_training_set_on(client, dataset, task, two)
            assert a.as_dict() == b.as_dict(), name
            assert digest(one) == digest(two), name
            split = pd.read_parquet(one)[["subject_id", "split"]]
            assert set(split["split"].astype(str)) == {"train", "tuning", "held_out"}


def test_an_unreachable_scheduler_is_a_clear_error(sharded, tmp_path):
    from tests.conftest import free_port

    proc = subprocess.run([str(BIN), "features", "--events", str(sharded), "--task",
                           str(ESKD_TASK), "--out", str(tmp_path / "x.parquet"),
                           "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "TWINCAST_DASK_TIMEOUT": "2"})
    assert proc.returncode == 2
    assert "cannot reach the Dask scheduler" in proc.stderr
    assert not (tmp_path / "x.parquet").exists()
    proc = subprocess.run([str(BIN), "features", "--events", str(sharded), "--task",
                           str(ESKD_TASK), "--out", str(tmp_path / "x.parquet"),
                           "--scheduler", "local:zero"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--scheduler" in proc.stderr


def test_a_folder_output_is_the_parts_in_shard_order(sharded, kalman_task, single, tmp_path):
    """An output named without a suffix is a folder of part files (no serial copy on the
    client), which read back in name order as the single process's file; an existing
    non-empty folder is refused before any work."""
    one, summary = single
    out = tmp_path / "train"
    with connect(Scheduler.parse("local:2")) as client:
        dist = write_training_set_on(client, open_meds(sharded), kalman_task, out,
                                     chunk_subjects=40)
        assert dist.as_dict() == summary.as_dict()
        parts = sorted(out.glob("*"))
        assert len(parts) == len(open_meds(sharded).files)
        assert all(p.suffix == ".parquet" for p in parts)
        assert pq.read_table(one).equals(pq.read_table(parts[0].parent))
        with pytest.raises(FileExistsError):
            write_training_set_on(client, open_meds(sharded), kalman_task, out)
    assert [p.name for p in tmp_path.iterdir()] == ["train"]  # nothing beside it
    proc = subprocess.run([str(BIN), "features", "--events", str(sharded), "--task",
                           str(TRAJECTORY_TASK), "--out", str(tmp_path / "folder")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--scheduler" in proc.stderr
