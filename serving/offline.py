"""No telemetry: MLflow and BentoML must not look up their hosts (nothing leaves here);
and a tracking server that does not answer is given up on quickly."""

from __future__ import annotations

import os

OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
               "DO_NOT_TRACK": "1"}
# the service learns in seconds that a tracking server is down, not after MLflow's
# default of seven retries with exponential back-off (minutes); training keeps those
SERVICE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def go_offline(*, service: bool = False) -> None:
    """Set these variables (unless already set) before MLflow or BentoML start."""
    for key, value in {**OFFLINE_ENV, **(SERVICE_ENV if service else {})}.items():
        os.environ.setdefault(key, value)
