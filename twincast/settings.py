"""Settings: one prefix (``TWINCAST_``), no side effects on import.

The local home folder (``.twincast/`` by default) holds the MLflow SQLite store, its
artifacts and the twin database, so the embedded default needs no server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
               "DO_NOT_TRACK": "1"}


class Settings(BaseSettings):
    """Everything configurable, read from ``TWINCAST_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TWINCAST_", extra="ignore")

    home: Path = Path(".twincast")
    mlflow_uri: str | None = None
    database_url: str | None = None
    task: str | None = None
    workers: int = 1
    model_poll_seconds: float = 30.0
    open_docs: bool = False
    open_metrics: bool = False
    # CDS Hooks: registered clients as JSON {"<issuer>": {"public_key": "<PEM>",
    # "algorithms": ["RS384", "ES384"]}}; cards turn warning/critical at these risks
    cds_clients: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cds_warning: float = 0.10
    cds_critical: float = 0.30

    def tracking_uri(self) -> str:
        """``TWINCAST_MLFLOW_URI`` wins over ``MLFLOW_TRACKING_URI``; else a local SQLite."""
        if self.mlflow_uri:
            return self.mlflow_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    def artifact_root(self) -> str:
        return (self.home / "mlartifacts").resolve().as_uri()

    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'twins.db').resolve()}"


def go_offline() -> None:
    """Keep MLflow and BentoML from looking up their telemetry hosts."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
