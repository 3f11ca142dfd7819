"""Training on a real Dask cluster (``training.cluster``): lightgbm.dask models whose
held-out metrics match the single-process run within a stated tolerance, the same
MLflow tracking, registry and gate, and a fit that survives a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
import pytest

from features.cluster import Scheduler, connect
from features.events import open_meds
from serving.model_source import ModelSource
from tests.conftest import TINY_OPTIONS, dask_cluster
from training.cluster import _round_losses, early_stopping_round, predict_rows
from training.registry import model_name
from training.tracking import Tracker
from training.train import CLUSTER_ROUNDS, TrainOptions, heldout_request, train
from twincast.cli import CLUSTER_ROUNDS as CLI_ROUNDS

# Trees grown on partitioned data differ from one process's (each machine bins and
# sums its own histograms), and on a 400-subject cohort a few held-out positives move
# an AUROC by about 0.01: the cluster's models must land within 0.03 of the single
# process's, far inside the intervals (about ±0.03 here).
AUROC_TOLERANCE = 0.03
OPTIONS = {**TINY_OPTIONS, "families": ["lightgbm", "logistic"], "cluster_rounds": 300}


def auroc(result, family: str, h: int) -> float:
    return result.candidates[family].report["horizons"][str(h)]["rows"]["auroc"]["estimate"]


@pytest.fixture(scope="module")
def on_cluster(small_cohort_dir, tiny_task, tracker, trained):
    """A run on a LocalCluster of two worker processes, into the session's registry
    (whose champion is ``trained``: the gate compares with it); it promotes nothing."""
    with connect(Scheduler.parse("local:2")) as client:
        result = train(small_cohort_dir, tiny_task, tracker,
                       TrainOptions(**OPTIONS, promote=False), log=lambda m: None,
                       client=client)
    return result


def test_cluster_metrics_match_the_single_process_within_tolerance(on_cluster, trained,
                                                                   tiny_task):
    for h in tiny_task.horizons_days:
        single, dist = auroc(trained, "lightgbm", h), auroc(on_cluster, "lightgbm", h)
        assert abs(single - dist) <= AUROC_TOLERANCE, (h, single, dist)
        assert dist > 0.75
    # the logistic baseline is fitted on a sample of at most 100,000 training rows: here
    # that is every row, so it is the single process's model
    for h in tiny_task.horizons_days:
        assert auroc(on_cluster, "logistic", h) == pytest.approx(auroc(trained, "logistic", h),
                                                                 abs=1e-9)
    # the same held-out rows, in the same order
    assert on_cluster.heldout_rows.equals(trained.heldout_rows)


def test_cluster_run_is_tracked_registered_and_gated(on_cluster, trained, tracker, tiny_task,
                                                    events):
    run = tracker.client.get_run(on_cluster.parent_run_id)
    assert run.data.tags["twincast.cluster"] == "dask"
    assert run.data.tags["twincast.cluster.rounds"] == str(OPTIONS["cluster_rounds"])
    assert run.data.tags["data_digest"] == trained.data_digest
    # the gate compared with the champion (the single-process run's version) on the
    # cluster; promotion was switched off
    assert int(on_cluster.version) > int(trained.version)
    assert "champion version" in on_cluster.reason
    assert on_cluster.promoted is False
    lgb_run = tracker.client.get_run(on_cluster.candidates["lightgbm"].run_id)
    for h in tiny_task.horizons_days:
        best = int(lgb_run.data.params[f"best_iteration_{h}d"])
        assert 1 <= best <= OPTIONS["cluster_rounds"]
    # the registered version loads and forecasts like any other
    loaded = ModelSource(tracker, tiny_task.name).load(on_cluster.version)
    model = on_cluster.candidates[on_cluster.best].bundle
    held = on_cluster.heldout_rows.iloc[:50]
    x, risk = loaded.bundle.predict_events(events, held["subject_id"].to_numpy(),
                                           held["prediction_time"].to_numpy().view(np.int64))
    np.testing.assert_array_equal(risk, model.predict_features(x))


@pytest.fixture(scope="module")
def events(small_cohort_dir):
    return open_meds(small_cohort_dir).read_all()


def test_the_cut_is_early_stopping_on_the_whole_eval_curve(small_cohort_dir, trained):
    """``_round_losses`` summed over any split of the eval rows is LightGBM's own eval
    curve, and ``early_stopping_round`` on it is where ``early_stopping(50)`` stops."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 5)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=3000) > 0.5).astype(np.float64)
    w = rng.uniform(0.5, 2.0, size=3000)
    xe, ye, we = x[:1000], y[:1000], w[:1000]
    record: dict = {}
    booster = lgb.train({"objective": "binary", "verbose": -1, "learning_rate": 0.3,
                         "num_leaves": 15, "deterministic": True, "num_threads": 1},
                        lgb.Dataset(x[1000:], y[1000:], weight=w[1000:]), 300,
                        valid_sets=[lgb.Dataset(xe, ye, weight=we)],
                        callbacks=[lgb.record_evaluation(record)])
    frame = pd.DataFrame(xe, columns=[f"f{i}" for i in range(5)])
    frame["_y"], frame["_w"] = ye, we
    names = [f"f{i}" for i in range(5)]
    sums = sum(_round_losses(part, booster.model_to_string(), names)
               for part in (frame.iloc[:400], frame.iloc[400:410], frame.iloc[410:]))
    curve = sums[:-1] / sums[-1]
    np.testing.assert_allclose(curve, record["valid_0"]["binary_logloss"], rtol=1e-6)
    stopped = lgb.train({"objective": "binary", "verbose": -1, "learning_rate": 0.3,
                         "num_leaves": 15, "deterministic": True, "num_threads": 1},
                        lgb.Dataset(x[1000:], y[1000:], weight=w[1000:]), 300,
                        valid_sets=[lgb.Dataset(xe, ye, weight=we)],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    assert stopped.best_iteration < 250  # it did stop early: the test can tell
    assert early_stopping_round(curve) == stopped.best_iteration
    assert CLI_ROUNDS == CLUSTER_ROUNDS  # the CLI's default is the training default


def test_the_gates_cluster_scoring_equals_the_model_package(small_cohort_dir, trained,
                                                            tracker, tiny_task):
    """``predict_rows`` (the champion scored shard by shard on the workers) gives the
    pyfunc package's own risks for the same held-out rows."""
    name = model_name(tiny_task.name)
    with tracker.active():
        model = mlflow.pyfunc.load_model(f"models:/{name}/{trained.version}")
        rows = trained.heldout_rows
        expected = model.predict(heldout_request(open_meds(small_cohort_dir).read_all(), rows))
    with connect(Scheduler.parse("local:2")) as client:
        got = predict_rows(client, open_meds(small_cohort_dir),
                           model.unwrap_python_model().bundle, rows)
    for h in tiny_task.horizons_days:
        np.testing.assert_array_equal(got[f"risk_{h}d"].to_numpy(),
                                      expected[f"risk_{h}d"].to_numpy())


def test_a_worker_killed_during_training_is_retried(small_cohort_dir, tiny_task, trained,
                                                    tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "art").as_uri())
    killed, logs = [], []
    with dask_cluster(2) as address, connect(Scheduler.parse(address)) as client:
        pids = client.run(os.getpid)
        stop = threading.Event()

        def killer() -> None:
            while not stop.is_set():
                for worker, keys in client.processing().items():
                    if any(str(k).startswith("('_train_part") or "_train_part" in str(k)
                           for k in keys):
                        os.kill(pids[worker], signal.SIGKILL)
                        killed.append(worker)
                        return
                time.sleep(0.05)

        watcher = threading.Thread(target=killer, daemon=True)
        watcher.start()
        try:
            result = train(small_cohort_dir, tiny_task, tracker,
                           TrainOptions(**{**OPTIONS, "families": ["lightgbm"],
                                           "trials": 1}),
                           log=logs.append, client=client)
        finally:
            stop.set()
            watcher.join(5)
    assert killed, "no LightGBM training task was seen to kill"
    assert any("lost a worker" in m and "running it again" in m for m in logs), logs
    for h in tiny_task.horizons_days:
        assert abs(auroc(result, "lightgbm", h) - auroc(trained, "lightgbm", h)) \
            <= AUROC_TOLERANCE
    assert result.promoted  # a fresh registry: the first champion
