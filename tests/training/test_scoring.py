"""Batch scoring (``twincast score``): the served model's forecasts for a whole cohort,
in this process and on a real Dask cluster, equal to the model's own predictions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.cluster import Scheduler, connect
from features.events import NAT_US, EventArrays, open_meds, write_meds
from features.pipeline import build_training_frame
from features.simulate import CODES
from serving.model_source import ModelSource
from tests.conftest import dask_cluster
from training.registry import BUNDLE_DIGEST_TAG
from training.scoring import risk_column, write_scores

BIN = Path(sys.executable).parent / "twincast"


@pytest.fixture(scope="module")
def model(trained, tracker, tiny_task):
    return ModelSource(tracker, tiny_task.name).load(trained.version)


@pytest.fixture(scope="module")
def nine_shards(small_cohort, tmp_path_factory) -> Path:
    return write_meds(small_cohort, tmp_path_factory.mktemp("nine") / "meds", codes=CODES,
                      shard_subjects=45)


@pytest.fixture(scope="module")
def in_process(model, nine_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "scores.parquet"
    summary = write_scores(open_meds(nine_shards), model.bundle, out, chunk_subjects=20)
    return out, summary


def test_scores_are_the_models_predictions_at_every_prediction_time(model, nine_shards,
                                                                    in_process):
    out, summary = in_process
    scores = pd.read_parquet(out)
    frame, _ = build_training_frame(open_meds(nine_shards), model.bundle.task)
    assert summary.rows == len(scores) == len(frame) > 0
    assert summary.shards == 9
    keys = ["subject_id", "prediction_time"]
    assert scores[keys].equals(frame[keys])
    assert (scores["split"].astype(str) == frame["split"].astype(str)).all()
    # the bundle featurises with its own spec: recompute and compare
    events = open_meds(nine_shards).read_all()
    x = model.bundle.features_for(EventArrays.from_events(events),
                                  frame["subject_id"].to_numpy(),
                                  frame["prediction_time"].to_numpy().view(np.int64))
    expected = model.bundle.predict_features(x)
    for i, h in enumerate(model.bundle.horizons):
        np.testing.assert_array_equal(scores[risk_column(h)].to_numpy(), expected[:, i])
    assert (np.diff(scores[[risk_column(h) for h in model.bundle.horizons]].to_numpy(),
                    axis=1) >= 0).all()


def test_last_event_scores_each_subject_once_at_its_last_event(model, nine_shards, tmp_path):
    out = tmp_path / "now.parquet"
    write_scores(open_meds(nine_shards), model.bundle, out, at="last-event")
    scores = pd.read_parquet(out)
    events = open_meds(nine_shards).read_all()
    timed = events[events["time"].notna()]
    last = timed.groupby("subject_id")["time"].max()
    assert scores["subject_id"].is_unique
    assert scores["subject_id"].tolist() == last.index.tolist()
    assert (scores["prediction_time"].to_numpy() == last.to_numpy()).all()
    arrays = EventArrays.from_events(events)
    x = model.bundle.features_for(arrays, scores["subject_id"].to_numpy(),
                                  scores["prediction_time"].to_numpy().view(np.int64))
    assert not (scores["prediction_time"].to_numpy().view(np.int64) == NAT_US).any()
    np.testing.assert_array_equal(scores[risk_column(730)].to_numpy(),
                                  model.bundle.predict_features(x)[:, -1])


def test_scores_to_a_folder_are_the_parts_with_their_provenance(model, nine_shards,
                                                                in_process, tmp_path):
    out = tmp_path / "scores"
    write_scores(open_meds(nine_shards), model.bundle, out, chunk_subjects=20,
                 metadata={"twincast.version": model.version})
    parts = sorted(out.glob("*.parquet"))
    assert len(parts) == 9
    assert pq.read_table(out).equals(pq.read_table(in_process[0]), check_metadata=False)
    assert all(pq.read_schema(p).metadata[b"twincast.version"] == model.version.encode()
               for p in parts)


def test_a_local_cluster_writes_the_same_scores(model, nine_shards, in_process, tmp_path):
    out = tmp_path / "scores.parquet"
    with connect(Scheduler.parse("local:2")) as client:
        write_scores(open_meds(nine_shards), model.bundle, out, client=client,
                     chunk_subjects=20)
    assert pq.read_table(out).equals(pq.read_table(in_process[0]))


def test_a_worker_killed_while_scoring_changes_nothing(model, nine_shards, in_process,
                                                       tmp_path):
    out = tmp_path / "scores.parquet"
    with dask_cluster(2) as address, connect(Scheduler.parse(address)) as client:
        before = set(client.run(os.getpid).values())
        calls = []

        def progress(n: int) -> None:
            calls.append(n)
            if len(calls) == 1:  # one shard is back, the others are queued or running
                busy = next(w for w, tasks in client.processing().items() if tasks)
                os.kill(client.run(os.getpid, workers=[busy])[busy], signal.SIGKILL)

        summary = write_scores(open_meds(nine_shards), model.bundle, out, client=client,
                               progress=progress, chunk_subjects=20)
        client.wait_for_workers(2, timeout=60)
        after = set(client.run(os.getpid).values())
    assert len(before - after) == 1
    assert summary.rows == in_process[1].rows
    assert pq.read_table(out).equals(pq.read_table(in_process[0]))


def test_the_cli_scores_with_a_version_and_records_it(model, nine_shards, in_process,
                                                         mlflow_home, tiny_task, tmp_path):
    out = tmp_path / "cli.parquet"
    env = {**os.environ, "TWINCAST_HOME": str(tmp_path / "home"),
           "TWINCAST_MLFLOW_URI": f"sqlite:///{mlflow_home / 'mlflow.db'}"}
    proc = subprocess.run([str(BIN), "score", "--events", str(nine_shards), "--out", str(out),
                           "--task", tiny_task.name, "--version", model.version,
                           "--scheduler", "local:2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).equals(pq.read_table(in_process[0]), check_metadata=False)
    meta = pq.read_schema(out).metadata
    assert meta[b"twincast.version"].decode() == model.version
    # the digest the registry recorded, that the bundle was checked against at load
    assert meta[b"twincast.bundle_sha256"].decode() == model.tags[BUNDLE_DIGEST_TAG]
    assert len(model.tags[BUNDLE_DIGEST_TAG]) == 64
    bad = subprocess.run([str(BIN), "score", "--events", str(nine_shards), "--out",
                          str(tmp_path / "x.parquet"), "--task", tiny_task.name,
                          "--version", "999"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "999" in bad.stderr
    assert not (tmp_path / "x.parquet").exists()
