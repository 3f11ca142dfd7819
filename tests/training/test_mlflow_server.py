"""The same training flow against a real ``mlflow server`` on loopback, backed by
PostgreSQL (CI has it at 127.0.0.1:5432; under CI=true this fails rather than skips)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import TINY_OPTIONS, free_port, stop
from training.registry import CHAMPION, model_name
from training.tracking import Tracker
from training.train import TrainOptions, heldout_request, train


@pytest.fixture
def mlflow_server(pg_database, tmp_path):
    port = free_port()
    backend = pg_database.replace("postgresql://", "postgresql+psycopg://", 1)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail("mlflow server did not start:\n"
                        + (tmp_path / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    try:
        yield url
    finally:
        stop(proc)
        log.close()


def test_training_against_a_tracking_server_on_postgresql(mlflow_server, small_cohort_dir,
                                                          small_cohort, tiny_task):
    tracker = Tracker(mlflow_server)
    result = train(small_cohort_dir, tiny_task, tracker,
                   TrainOptions(**{**TINY_OPTIONS, "families": ["logistic"]}), log=lambda m: None)
    assert result.promoted
    name = model_name(tiny_task.name)
    champ = tracker.registry.version_by_alias(name, CHAMPION)
    assert str(champ.version) == result.version
    assert tracker.registry.promotion_log(tiny_task.name)[0].to_version == result.version
    with tracker.active():
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(heldout_request(small_cohort, result.heldout_rows))
    np.testing.assert_array_equal(out[["risk_365d", "risk_730d"]].to_numpy(),
                                  result.candidates["logistic"].heldout_risk)
