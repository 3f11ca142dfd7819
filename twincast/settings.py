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

from serving.config import ServingConfig
from serving.offline import go_offline

__all__ = ["Settings", "go_offline"]



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
    # BentoML's OpenTelemetry spans per request (configure an exporter in BentoML's own
    # configuration); off, requests skip the tracing middleware (~0.2 ms each)
    tracing: bool = False
    # the service's public base URL, e.g. https://twincast.example.org (CDS Hooks tokens
    # name its endpoints as their audience)
    public_url: str | None = None
    # CDS Hooks: registered clients as JSON {"<issuer>": {"public_key": "<PEM>",
    # "algorithms": ["RS384"]}} or {"<issuer>": {"jwks": {"keys": [...]}}}; cards turn
    # warning/critical at the served task's alert thresholds (its ``alerts`` block)
    cds_clients: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # a care-team page session lasts this long from sign-in, and ends unused this long
    ui_session_minutes: float = 480
    ui_idle_minutes: float = 30
    refresh_chunk: int = 256
    refresh_lease_seconds: float = 30.0
    anchor_seconds: float = 300.0
    max_bulk_twins: int = 2_000
    max_bulk_events: int = 50_000
    # fault injection for tests, comma-separated failpoint names; never set in production
    failpoints: str = ""

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

    def serving(self) -> ServingConfig:
        """The service's typed configuration (the only way settings reach ``serving``):
        every field the two share, plus the ones settings derive."""
        gone = [k for k in ("TWINCAST_CDS_WARNING", "TWINCAST_CDS_CRITICAL") if k in os.environ]
        if gone:
            raise ValueError(f"{', '.join(gone)} no longer exist: the CDS cards' indicator "
                             "uses the task file's alert thresholds (its 'alerts' block)")
        derived = {"database_url", "tracking_uri", "artifact_root", "failpoints"}
        shared = set(ServingConfig.model_fields) & set(type(self).model_fields) - derived
        return ServingConfig(
            **self.model_dump(include=shared),
            database_url=self.database(), tracking_uri=self.tracking_uri(),
            artifact_root=self.artifact_root(),
            failpoints=frozenset(f for f in self.failpoints.split(",") if f))
