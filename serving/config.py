"""The service's configuration: one typed object, filled in by the composition package.

``serving`` never reads ``TWINCAST_*`` variables itself and never imports ``twincast``;
``twincast.settings.Settings.serving()`` builds this object.  Unknown keys are refused.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str = Field(description="twin store: sqlite:///… or postgresql://…")
    tracking_uri: str = Field(description="MLflow tracking URI")
    artifact_root: str | None = Field(default=None, description="MLflow artifact root "
                                      "for a local SQLite tracking store")
    task: str | None = Field(default=None, description="served task; None: the only "
                             "registered twincast model")
    model_poll_seconds: float = Field(default=30.0, ge=0, description="how often a worker "
                                      "checks the champion alias (0: never)")
    refresh_chunk: int = Field(default=256, ge=1, le=10_000)
    refresh_lease_seconds: float = Field(default=30.0, gt=0, description="a refresh whose "
                                         "worker stops heart-beating this long is taken over")
    max_bulk_twins: int = Field(default=2_000, ge=1)
    max_bulk_events: int = Field(default=50_000, ge=1)
    open_docs: bool = False
    open_metrics: bool = False
    cds_clients: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cds_warning: float = Field(default=0.10, ge=0, le=1)
    cds_critical: float = Field(default=0.30, ge=0, le=1)
    failpoints: frozenset[str] = Field(default_factory=frozenset, description="fault "
                                       "injection for tests; empty in production")

    @model_validator(mode="after")
    def _thresholds(self) -> ServingConfig:
        if self.cds_warning > self.cds_critical:
            raise ValueError("cds_warning must not exceed cds_critical")
        return self
