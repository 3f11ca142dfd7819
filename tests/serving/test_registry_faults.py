"""The twin service beside a real ``mlflow server`` that goes away and comes back: the
service starts without it (not ready, forecasts 503), loads the champion once it
answers, keeps serving through a reload while it is down, and the audit says
"unreachable", never "deleted"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.store import open_store
from tests.conftest import TINY_OPTIONS, free_port, stop
from tests.serving.conftest import _start
from tests.serving.test_service import api_events, history
from training.tracking import Tracker
from training.train import TrainOptions, train

BIN = Path(sys.executable).parent


class MlflowServer:
    """``mlflow server`` on a fixed loopback port over a PostgreSQL backend: stoppable and
    restartable on the same port."""

    def __init__(self, backend: str, root: Path):
        self.backend, self.root, self.port = backend, root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        with open(self.root / "mlflow.log", "a") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", str(self.root / "artifacts"), "--host",
                 "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n"
                            + (self.root / "mlflow.log").read_text()[-3000:])
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def wait_for(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.3)
    return time.monotonic() - t0


def test_the_service_rides_out_a_registry_that_is_down(pg_database, tmp_path, small_cohort_dir,
                                                       small_cohort, tiny_task):
    registry = MlflowServer(pg_database.replace("postgresql://", "postgresql+psycopg://", 1),
                            tmp_path)
    registry.start()
    svc = None
    try:
        result = train(small_cohort_dir, tiny_task, Tracker(registry.url),
                       TrainOptions(**{**TINY_OPTIONS, "families": ["logistic"]}),
                       log=lambda m: None)
        assert result.promoted
        registry.stop()  # down before the service starts
        db_url = f"sqlite:///{tmp_path / 'twins.db'}"
        store = open_store(db_url)
        keys = {r: store.keys.create(f"{r}-key", r) for r in ("clinical", "admin")}
        store.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TWINCAST_", "MLFLOW_"))}
        env.update({"TWINCAST_HOME": str(tmp_path), "TWINCAST_MLFLOW_URI": registry.url,
                    "TWINCAST_DATABASE_URL": db_url, "TWINCAST_TASK": tiny_task.name,
                    "TWINCAST_MODEL_POLL_SECONDS": "1",
                    "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                    "MLFLOW_DISABLE_TELEMETRY": "true"})
        svc, url = _start(tmp_path, env, wait="/v1/health")
        clinical = {"Authorization": f"Bearer {keys['clinical']}"}
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        body = {"subject_id": 1, "events": api_events(history(small_cohort, result, 0))}

        def forecast() -> httpx.Response:
            return httpx.post(f"{url}/v1/forecast", json=body, headers=clinical, timeout=60)

        ready = httpx.get(f"{url}/v1/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["registry"] == "unreachable"
        assert ready.json()["checks"]["model"] == "missing"
        r = forecast()
        assert r.status_code == 503 and r.headers.get("content-type") == "application/json"

        registry.start()  # back: the watcher loads the champion by itself
        recovered = wait_for(lambda: httpx.get(f"{url}/v1/ready", timeout=10).status_code
                             == 200, 90, "the service did not load the champion")
        served = forecast()
        assert served.status_code == 200, served.text

        registry.stop()  # down during a reload: the current model keeps serving
        r = httpx.post(f"{url}/v1/admin/reload", headers=admin, timeout=60)
        assert r.status_code == 503 and r.json()["error"] == "registry_unreachable"
        again = forecast()
        assert again.status_code == 200 and again.json()["risks"] == served.json()["risks"]

        # a stored forecast audited while the registry is down: unreachable, not deleted
        r = httpx.post(f"{url}/v1/twins/42/events", json={"events": body["events"]},
                       headers=clinical, timeout=60)
        assert r.status_code == 200, r.text
        fid = r.json()["forecast"]["forecast_id"]
        audit = subprocess.run([str(BIN / "twincast"), "audit", "forecast", fid],
                               env=env, capture_output=True, text=True, timeout=300)
        assert audit.returncode == 1, audit.stdout + audit.stderr
        assert "registry is unreachable" in audit.stdout and "deleted" not in audit.stdout
        print(f"registry back after a restart: champion served {recovered:.1f}s later")
    finally:
        if svc is not None:
            stop(svc)
        registry.stop()
