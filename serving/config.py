"""The service's configuration: one typed object, filled in by the composition package.

``serving`` never reads ``TWINCAST_*`` variables itself and never imports ``twincast``;
``twincast.settings.Settings.serving()`` builds this object.  Unknown keys are refused.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.jwtkeys import client_keys

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})


class CdsClientConfig(BaseModel):
    """A registered CDS Hooks client (keyed by its JWT issuer): its public key as PEM, or
    a JWKS document whose keys carry ``kid``s (so the client can rotate keys; the service
    never fetches keys from a URL named in a token), and the algorithms it signs with —
    asymmetric only, as CDS Hooks 2.0 requires."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    public_key: str | None = Field(default=None, description="PEM public key")
    jwks: dict[str, Any] | None = Field(default=None, description='{"keys": [JWK, …]}, '
                                        "each with a kid")
    algorithms: tuple[str, ...] = ("RS384", "ES384")

    @model_validator(mode="after")
    def _keys(self) -> CdsClientConfig:
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if not self.algorithms or bad:
            raise ValueError(f"algorithms must be asymmetric ({sorted(ASYMMETRIC_ALGORITHMS)}"
                             f"), got {list(self.algorithms)}")
        if (self.public_key is None) == (self.jwks is None):
            raise ValueError("give exactly one of public_key (PEM) and jwks")
        client_keys(self)  # parses every key now, at start
        return self


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
    anchor_seconds: float = Field(default=300.0, ge=0, description="how often one worker "
                                  "anchors the forecast chains and access log in the "
                                  "tracking store (0: never)")
    max_bulk_twins: int = Field(default=2_000, ge=1)
    max_bulk_events: int = Field(default=50_000, ge=1)
    open_docs: bool = False
    open_metrics: bool = False
    public_url: str | None = Field(default=None, pattern=r"^https?://[^/?#]+(/[^?#]*)?$",
                                   description="the service's public base URL (CDS Hooks "
                                   "tokens must name its endpoints as their audience)")
    cds_clients: dict[str, CdsClientConfig] = Field(default_factory=dict)
    ui_session_minutes: float = Field(default=480, gt=0, le=7 * 24 * 60, description=(
        "how long a care-team page session lasts from sign-in"))
    ui_idle_minutes: float = Field(default=30, ge=1, le=24 * 60, description=(
        "a page session unused this long ends"))
    failpoints: frozenset[str] = Field(default_factory=frozenset, description="fault "
                                       "injection for tests; empty in production")

    @model_validator(mode="after")
    def _checks(self) -> ServingConfig:
        if self.cds_clients and not self.public_url:
            raise ValueError("cds_clients need public_url: a CDS Hooks token's audience is "
                             "the endpoint's public URL, never the request's Host header")
        return self

    def endpoint(self, path: str) -> str:
        """The public URL of ``path`` (a CDS Hooks token's expected audience)."""
        return (self.public_url or "").rstrip("/") + path
