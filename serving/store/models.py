"""The twin store's tables (SQLAlchemy 2).  Times are naive UTC in the database.

Forecasts and the access log are append-only: the application never updates or deletes
them, and each forecast row carries a digest of its content.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT keys everywhere, but SQLite only auto-increments an INTEGER PRIMARY KEY
BigId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class Twin(Base):
    __tablename__ = "twins"

    subject_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    last_event_time: Mapped[datetime | None] = mapped_column(DateTime)
    event_count: Mapped[int] = mapped_column(Integer, default=0)
    # the twin's current state as served by GET /v1/twins/{id} (JSON), rewritten in the
    # same transaction as every change, so a read is one primary-key lookup
    view: Mapped[str | None] = mapped_column(Text)
    # the model behind the current forecast: a refresh re-forecasts twins whose version is
    # not the served one (NULL: never forecast, e.g. imported)
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(32), index=True)
    # the digest of the twin's latest forecast row: the head of its chain
    forecast_head: Mapped[str | None] = mapped_column(String(64))


class Identifier(Base):
    """External patient identifiers (e.g. FHIR ``system|value``) mapped to a twin."""

    __tablename__ = "identifiers"
    __table_args__ = (UniqueConstraint("system", "value", name="uq_identifier"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    system: Mapped[str] = mapped_column(String(1024))  # scoped by sender where needed
    value: Mapped[str] = mapped_column(String(255))
    subject_id: Mapped[int] = mapped_column(ForeignKey("twins.subject_id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("subject_id", "idempotency_key", name="uq_event_idempotency"),
        Index("ix_events_subject_time", "subject_id", "time"),
        # partial: only events of resources have a logical id (migration 0012)
        Index("ix_events_subject_logical", "subject_id", "logical_id",
              sqlite_where=text("logical_id IS NOT NULL"),
              postgresql_where=text("logical_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("twins.subject_id"))
    time: Mapped[datetime | None] = mapped_column(DateTime)
    code: Mapped[str] = mapped_column(String(255))
    numeric_value: Mapped[float | None] = mapped_column(Float)
    text_value: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(DateTime)  # read per twin only
    idempotency_key: Mapped[str] = mapped_column(String(128))
    source: Mapped[str | None] = mapped_column(String(255))
    # the resource the event came from ("Observation/abc", a component
    # "Observation/abc#<system>|<code>"): a new version of it supersedes the rows it drops
    logical_id: Mapped[str | None] = mapped_column(String(200))
    # when a new version or a retraction took the event back (NULL: live)
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime)


class Forecast(Base):
    __tablename__ = "forecasts"
    __table_args__ = (Index("ix_forecasts_subject_seq", "subject_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    forecast_id: Mapped[str] = mapped_column(String(36), unique=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("twins.subject_id"))
    as_of: Mapped[datetime | None] = mapped_column(DateTime)
    watermark: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16))  # ok | not_eligible
    reason: Mapped[str | None] = mapped_column(Text)
    risks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    contributions: Mapped[list[Any] | None] = mapped_column(JSON)
    # version 3: biomarker trajectories (training.trajectory), covered by the digest
    trajectories: Mapped[list[Any] | None] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str] = mapped_column(String(64))
    feature_spec_digest: Mapped[str] = mapped_column(String(64))
    task_digest: Mapped[str] = mapped_column(String(64))
    feature_digest: Mapped[str | None] = mapped_column(String(64))
    code_version: Mapped[str] = mapped_column(String(128))
    requested_by: Mapped[str] = mapped_column(String(255))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    row_digest: Mapped[str] = mapped_column(String(64))
    # version 2: the digest also covers prev_digest, the twin's previous row's digest
    prev_digest: Mapped[str | None] = mapped_column(String(64))
    digest_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class AccessLog(Base):
    __tablename__ = "access_log"
    __table_args__ = (Index("ix_access_subject_time", "subject_id", "time"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    key_name: Mapped[str | None] = mapped_column(String(255))  # the key's or person's name
    role: Mapped[str | None] = mapped_column(String(32))
    # a page's person (no foreign key: the log outlives accounts, as it does keys' names)
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    action: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[int | None] = mapped_column(BigInteger)
    status_code: Mapped[int] = mapped_column(Integer)


class ModelLoad(Base):
    """Every model a worker loads: moves made by hand in the MLflow UI are seen here."""

    __tablename__ = "model_loads"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(255))


class RefreshJob(Base):
    """Re-forecasting every twin whose forecast is not the served version's.

    One is created each time the served version changes (a roll-back too); a worker
    claims it with a lease and heart-beats; another takes it over when the lease expires.
    States and transitions: ``serving.states``.
    """

    __tablename__ = "refresh_jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    verified: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)


class ServedModel(Base):
    """The version the service serves, per model: every write transaction checks it and
    reloads first when its own model is behind."""

    __tablename__ = "served_model"

    model_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(DateTime)
    changed_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(255))


class IdCounter(Base):
    """SQLite's source of store-assigned twin ids (PostgreSQL uses a sequence)."""

    __tablename__ = "id_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_value: Mapped[int] = mapped_column(BigInteger)


class CdsFeedback(Base):
    """What a clinician did with a CDS Hooks card (accepted or overridden, and why)."""

    __tablename__ = "cds_feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime)
    service_id: Mapped[str] = mapped_column(String(255))
    card: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(32))
    override_reason: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    outcome_time: Mapped[datetime | None] = mapped_column(DateTime)
    client: Mapped[str | None] = mapped_column(String(255))


class CdsToken(Base):
    """A CDS Hooks JWT seen (issuer, ``jti``), kept until it expires: a replay is refused."""

    __tablename__ = "cds_tokens"

    issuer: Mapped[str] = mapped_column(String(512), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Lease(Base):
    """A named lease one worker holds at a time (e.g. the periodic audit anchor)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class MonitoringAlert(Base):
    """An alert a monitoring run raised, with its evidence (append-only)."""

    __tablename__ = "monitoring_alerts"
    __table_args__ = (Index("ix_monitoring_alerts_model", "model_name", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    run_id: Mapped[str] = mapped_column(String(64))  # the monitoring run (MLflow run id)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # metric | drift
    name: Mapped[str] = mapped_column(String(255))  # the metric or feature
    horizon_days: Mapped[int | None] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column(DateTime)
    window_end: Mapped[datetime] = mapped_column(DateTime)
    value: Mapped[float] = mapped_column(Float)
    reference: Mapped[float] = mapped_column(Float)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)


class User(Base):
    """A person who signs in to the care-team pages (``/ui``): password hashed with
    argon2; a disabled account's sessions stop working at once."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime)


class UiSession(Base):
    """A signed-in browser: the cookie's token is stored hashed (SHA-256)."""

    __tablename__ = "ui_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)  # absolute
    last_seen_at: Mapped[datetime] = mapped_column(DateTime)  # for the idle timeout
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)


class TwinRisk(Base):
    """A twin's current risk per horizon (rewritten with every forecast, like the view),
    with the previous forecast's risk, and the alert state: ``armed`` until an alert
    opens, again once the risk falls below threshold - hysteresis.  The population page
    sorts and filters on it."""

    __tablename__ = "twin_risks"
    __table_args__ = (
        # one index per order, each holding the window's end (the filter every list
        # has), one covering the counts, one for the open-alert filter
        Index("ix_twin_risks_rank", "horizon_days", "risk", "subject_id", "expires_at",
              "last_event_time"),
        Index("ix_twin_risks_rise", "horizon_days", "rise", "subject_id", "expires_at",
              "risk", "last_event_time"),
        Index("ix_twin_risks_quiet", "horizon_days", "last_event_time", "subject_id",
              "expires_at", "risk"),
        Index("ix_twin_risks_window", "horizon_days", "expires_at", "risk", "rise",
              "last_event_time", "subject_id"),
        Index("ix_twin_risks_open", "horizon_days", "risk", "subject_id", "expires_at",
              sqlite_where=text("open_alert_id IS NOT NULL"),
              postgresql_where=text("open_alert_id IS NOT NULL")),
    )

    subject_id: Mapped[int] = mapped_column(ForeignKey("twins.subject_id"), primary_key=True)
    horizon_days: Mapped[int] = mapped_column(Integer, primary_key=True)
    risk: Mapped[float | None] = mapped_column(Float)  # NULL: not eligible
    previous_risk: Mapped[float | None] = mapped_column(Float)
    # risk - previous_risk, when the previous forecast came from the same model version
    rise: Mapped[float | None] = mapped_column(Float)
    last_event_time: Mapped[datetime | None] = mapped_column(DateTime)  # the twin's
    as_of: Mapped[datetime | None] = mapped_column(DateTime)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)  # as_of + horizon
    forecast_id: Mapped[str] = mapped_column(String(36))
    model_version: Mapped[str] = mapped_column(String(32))
    armed: Mapped[bool] = mapped_column(Boolean, default=True)
    open_alert_id: Mapped[int | None] = mapped_column(BigInteger)  # unacknowledged alert


class TwinAlert(Base):
    """A forecast that crossed its horizon's threshold upward (append-only).

    ``kind``: ``alert`` (a new forecast of the twin: for the care team) or ``review``
    (the all-twin refresh after a model change: queued for review, pages nobody)."""

    __tablename__ = "twin_alerts"
    __table_args__ = (Index("ix_twin_alerts_open", "kind", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    subject_id: Mapped[int] = mapped_column(ForeignKey("twins.subject_id"), index=True)
    horizon_days: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    forecast_id: Mapped[str] = mapped_column(String(36))
    risk: Mapped[float] = mapped_column(Float)
    previous_risk: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    as_of: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)  # the forecast's horizon ends
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(32))
    previous_model_version: Mapped[str | None] = mapped_column(String(32))


class AlertAck(Base):
    """Who acknowledged an alert (or reviewed a queued crossing), when and why
    (append-only; one per alert)."""

    __tablename__ = "alert_acks"

    alert_id: Mapped[int] = mapped_column(ForeignKey("twin_alerts.id"), primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))  # a person, or
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))  # a key
    user_name: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
