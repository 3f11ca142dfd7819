"""Request and response bodies (pydantic; unknown fields are rejected).

Times at the edge are timezone-aware: a time without an offset is a 422.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

MAX_EVENTS_PER_REQUEST = 1000
CLOCK_SKEW = timedelta(minutes=5)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=True)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _not_future(t: datetime | None) -> datetime | None:
    if t is not None and t > datetime.now(UTC) + CLOCK_SKEW:
        raise ValueError("time is in the future")
    return t


class EventIn(_In):
    """One event for a twin (MEDS fields; the subject comes from the URL)."""

    time: AwareDatetime | None = Field(
        description="When it happened, with a UTC offset; null for a static fact")
    code: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^\S+$",
                               examples=["LAB//EGFR"])]
    numeric_value: float | None = Field(default=None, description="Finite number or null")
    text_value: Annotated[str, Field(max_length=10_000)] | None = None
    event_id: Annotated[str, Field(min_length=1, max_length=120)] | None = Field(
        default=None, description="The client's id for the event; re-sending it adds nothing")

    _future = field_validator("time")(lambda cls, v: _not_future(v))


class EventsIn(_In):
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
    as_of: AwareDatetime | None = Field(
        default=None, description="Forecast as of this time (default: the latest event)")

    _future = field_validator("as_of")(lambda cls, v: _not_future(v))


class StatelessIn(_In):
    """A history supplied in full; nothing is stored."""

    subject_id: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
    as_of: AwareDatetime | None = None

    _future = field_validator("as_of")(lambda cls, v: _not_future(v))


class Contribution(_Out):
    horizon_days: int
    feature: str
    label: str
    value: float | None
    value_text: str
    contribution: float
    scale: str
    text: str


class ModelRef(_Out):
    name: str
    version: str
    run_id: str


class ForecastOut(_Out):
    forecast_id: str
    subject_id: int
    as_of: AwareDatetime | None
    status: Literal["ok", "not_eligible"]
    reason: str | None = None
    risks: dict[str, float] | None = Field(
        default=None, description="Risk per horizon, e.g. {'365d': 0.04, '730d': 0.09}")
    contributions: list[Contribution] | None = None
    model: ModelRef
    watermark: AwareDatetime | None = None
    created_at: AwareDatetime | None = None
    stored: bool = True


class IngestOut(_Out):
    added: int
    duplicates: int
    forecast: ForecastOut


class FhirPatientOut(_Out):
    identifier: str = Field(description="system|value of the Patient's first identifier")
    subject_id: int
    added: int
    duplicates: int
    forecast: ForecastOut


class FhirIngestOut(_Out):
    patients: list[FhirPatientOut]
    unmapped: dict[str, int] = Field(description="codes twincast does not map, counted")
    skipped: dict[str, int] = Field(description="resources twincast does not use, counted")


class ValueOut(_Out):
    code: str
    time: AwareDatetime | None
    numeric_value: float | None
    text_value: str | None


class TwinOut(_Out):
    subject_id: int
    created_at: AwareDatetime
    last_event_time: AwareDatetime | None
    event_count: int
    latest_values: list[ValueOut]
    forecast: ForecastOut | None


class ForecastPage(_Out):
    items: list[ForecastOut]
    total: int
    limit: int
    offset: int


class ModelOut(_Out):
    name: str
    version: str
    run_id: str
    family: str
    horizons_days: list[int]
    feature_spec_digest: str
    task_digest: str
    data_digest: str | None
    code_version: str
    loaded_at: AwareDatetime
    metrics: dict[str, float]


class ReloadOut(_Out):
    previous_version: str | None
    version: str
    changed: bool
    refresh: RefreshOut | None = None


class RefreshOut(_Out):
    model_name: str
    model_version: str
    state: str
    total: int
    done: int
    started_at: AwareDatetime
    finished_at: AwareDatetime | None
    error: str | None


class AccessOut(_Out):
    time: AwareDatetime
    key_name: str | None
    role: str | None
    method: str
    path: str
    action: str
    subject_id: int | None
    status_code: int


class ErrorField(BaseModel):
    loc: list[Any]
    msg: str


class ErrorOut(BaseModel):
    error: str
    message: str
    fields: list[ErrorField] = []


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = {}


ReloadOut.model_rebuild()
