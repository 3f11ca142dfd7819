"""No telemetry: MLflow and BentoML must not look up their hosts (nothing leaves here)."""

from __future__ import annotations

import os

OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
               "DO_NOT_TRACK": "1"}


def go_offline() -> None:
    """Set the opt-out variables (unless already set) before MLflow or BentoML start."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
