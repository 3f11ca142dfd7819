"""Request and response bodies (pydantic; unknown fields are rejected).

Times at the edge are timezone-aware: a time without an offset is a 422.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from serving.store.ids import ASSIGNED_MAX, CLIENT_ID_MAX
from serving.store.twins import EventRow, storable

MAX_EVENTS_PER_REQUEST = 1000
MAX_EVENTS_PER_BULK_TWIN = 10_000
HARD_MAX_BULK_TWINS = 100_000
CLOCK_SKEW = timedelta(minutes=5)
ClientSubjectId = Annotated[int, Field(ge=0, le=CLIENT_ID_MAX, strict=True, description=(
    "the twin's MEDS subject_id, chosen by the client: 0 to 2**52 - 1 (ids from 2**52 "
    "up are assigned by the store to patients known by an external identifier)"))]


def _text_time(v: Any) -> Any:
    if v is not None and not isinstance(v, str | datetime):
        raise ValueError("a time is an RFC 3339 string with a UTC offset")
    return v


# a date-time given as text (a number is not a time here), with its UTC offset
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_text_time)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=True)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _not_future(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    if t.year in (1, 9999):  # only there can a UTC offset (under a day) leave the range
        try:
            t.astimezone(UTC)
        except OverflowError:
            raise ValueError("time is outside the representable range") from None
    if t > datetime.now(UTC) + CLOCK_SKEW:
        raise ValueError("time is in the future")
    return t


def _in_float32(v: float | None) -> float | None:
    if not storable(v):
        raise ValueError("outside the float32 range that MEDS values are stored in")
    return v


class EventIn(_In):
    """One event for a twin (MEDS fields; the subject comes from the URL)."""

    time: Rfc3339 | None = Field(
        description="When it happened: an RFC 3339 date-time with a UTC "
        "offset, not in the future (more than 5 minutes ahead is a 422); null for a static "
        "fact")
    code: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^\S+$",
                               examples=["LAB//EGFR"])]
    numeric_value: float | None = Field(default=None, strict=True,
                                        description="Finite number or null")
    text_value: Annotated[str, Field(max_length=10_000)] | None = None
    event_id: Annotated[str, Field(min_length=1, max_length=120)] | None = Field(
        default=None, description="The client's id for the event; re-sending it adds nothing")

    _future = field_validator("time")(lambda cls, v: _not_future(v))

    _float32 = field_validator("numeric_value")(lambda cls, v: _in_float32(v))

    def to_row(self) -> EventRow:
        """As the write path takes it: naive UTC."""
        return EventRow(naive_utc(self.time), self.code, self.numeric_value,
                        self.text_value, self.event_id)


def naive_utc(t: datetime | None) -> datetime | None:
    """An aware time as naive UTC: its fields, less its offset (a third of the cost of
    ``astimezone`` and ``replace`` on pydantic's tzinfo: the bulk route's 20,000 events)."""
    if t is None:
        return None
    off = t.utcoffset()
    naive = datetime(t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond)  # noqa: DTZ001
    return naive - off if off else naive


class EventsIn(_In):
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
    as_of: Rfc3339 | None = Field(
        default=None,
        description="Forecast as of this time (default: the latest event); not in the future")

    _future = field_validator("as_of")(lambda cls, v: _not_future(v))


class BulkTwinIn(_In):
    subject_id: ClientSubjectId
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_BULK_TWIN)]
    as_of: Rfc3339 | None = None

    _future = field_validator("as_of")(lambda cls, v: _not_future(v))


class BulkIn(_In):
    """Many twins' events in one request: all stored, or none."""

    twins: Annotated[list[BulkTwinIn], Field(min_length=1, max_length=HARD_MAX_BULK_TWINS)]


class StatelessIn(_In):
    """A history supplied in full; nothing is stored."""

    subject_id: Annotated[int, Field(ge=0, le=ASSIGNED_MAX, strict=True)] = 0
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
    as_of: Rfc3339 | None = None

    _future = field_validator("as_of")(lambda cls, v: _not_future(v))


class ScenarioEventIn(_In):
    """A hypothetical event, placed at the what-if's as-of time."""

    code: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^\S+$",
                               examples=["RX//SGLT2", "VITAL//SBP"])]
    numeric_value: float | None = Field(default=None, strict=True, description=(
        "the value of a numeric code (in the code's unit), else null"))

    _float32 = field_validator("numeric_value")(lambda cls, v: _in_float32(v))


class WhatIfIn(_In):
    """Hypothetical events at one as-of time; the answer stores nothing."""

    events: Annotated[list[ScenarioEventIn], Field(min_length=1, max_length=50)]
    as_of: Rfc3339 | None = Field(default=None, description=(
        "the time of the scenario and of both forecasts (default: the twin's latest "
        "event; never 'now', which would also move age and days-since features)"))

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


class TrajectoryInterval(_Out):
    level: float = Field(description="nominal coverage, e.g. 0.8 for the 10th to 90th "
                         "percentile (conformalised on the tuning split)")
    lower: float
    upper: float


class TrajectoryOut(_Out):
    code: str
    unit: str | None
    horizon_days: int
    median: float
    intervals: list[TrajectoryInterval]
    tolerance_days: int = Field(description="the forecast is of the value measured nearest "
                                "as_of + horizon_days, within this many days")
    conditional_on: str = Field(description="a patient who reaches the outcome or dies has "
                                "no such value: read the trajectory beside the risk")


class ForecastOut(_Out):
    forecast_id: str
    subject_id: int
    as_of: AwareDatetime | None
    status: Literal["ok", "not_eligible"]
    reason: str | None = None
    risks: dict[str, float] | None = Field(
        default=None, description="Risk per horizon, e.g. {'365d': 0.04, '730d': 0.09}")
    contributions: list[Contribution] | None = None
    trajectories: list[TrajectoryOut] | None = Field(
        default=None, description="where each of the task's numeric codes is heading: a "
        "forecast, never a measurement")
    model: ModelRef
    watermark: AwareDatetime | None = None
    created_at: AwareDatetime | None = None
    stored: bool = True


class WhatIfAnswer(_Out):
    status: Literal["ok", "not_eligible"]
    reason: str | None
    risks: dict[str, float] | None
    trajectories: list[TrajectoryOut] | None


class TrajectoryDifference(_Out):
    code: str
    unit: str | None
    horizon_days: int
    median: float


class WhatIfDifference(_Out):
    risks: dict[str, float]
    trajectories: list[TrajectoryDifference]


class ScenarioEventOut(_Out):
    code: str
    numeric_value: float | None
    time: AwareDatetime


class WhatIfOut(_Out):
    subject_id: int
    as_of: AwareDatetime
    model: ModelRef
    scenario_events: list[ScenarioEventOut]
    baseline: WhatIfAnswer
    scenario: WhatIfAnswer
    difference: WhatIfDifference | None = Field(description=(
        "scenario minus baseline (null when either is not eligible)"))
    interpretation: Literal["associational"]
    interpretation_text: str = Field(description="show it with every difference")
    stored: Literal[False]


class IngestOut(_Out):
    added: int
    duplicates: int
    forecast: ForecastOut


class BulkTwinOut(_Out):
    subject_id: int
    added: int
    duplicates: int
    created: bool
    forecast_id: str
    status: Literal["ok", "not_eligible"]
    reason: str | None
    as_of: AwareDatetime | None
    risks: dict[str, float] | None


class BulkOut(_Out):
    twins: list[BulkTwinOut]
    events_added: int
    model: ModelRef
    report: dict[str, Any] | None = Field(None, description=(
        "for FHIR NDJSON bodies: the mapping report (as POST /v1/fhir answers it)"))


class FhirPatientOut(_Out):
    identifier: str = Field(description="system|value of the Patient's first identifier, "
                            "else Patient/<id>")
    subject_id: int
    created: bool = Field(description="a new twin was made for this patient")
    added: int
    duplicates: int
    superseded: int = Field(0, description="stored values taken back: corrected by a new "
                            "version of their resource, or entered in error")
    forecast: ForecastOut


class FhirIngestOut(_Out):
    patients: list[FhirPatientOut]
    unmapped: dict[str, int] = Field(description="codes twincast does not map, counted")
    skipped: dict[str, int] = Field(description="resources twincast does not use, counted")
    report: dict[str, Any] = Field(description=(
        "the mapping report: mapped codes ('twincast code <- system|code') and unmapped "
        "ones with counts, coverage per resource type (values sent and events kept), and "
        "'starved': the served model's features that no event of this input feeds"))


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


class PopulationItem(_Out):
    subject_id: int
    horizon_days: int
    risk: float | None = Field(description="the risk of the outcome from as_of to "
                               "horizon_ends")
    previous_risk: float | None = Field(description="the twin's previous forecast's risk")
    rise: float | None
    as_of: AwareDatetime | None
    horizon_ends: AwareDatetime | None = Field(description="as_of + horizon: after it the "
                                               "forecast has expired")
    expired: bool
    forecast_id: str
    model_version: str
    last_event_time: AwareDatetime | None
    days_since_last_event: int | None
    open_alert_id: int | None


class PopulationPage(_Out):
    items: list[PopulationItem]
    total: int
    limit: int
    offset: int
    horizon_days: int
    now: AwareDatetime
    sort: Literal["risk", "rise", "quiet"]
    expired: bool


class AlertItem(_Out):
    id: int
    created_at: AwareDatetime
    subject_id: int
    horizon_days: int
    kind: Literal["alert", "review"] = Field(description="alert: a new forecast crossed "
                                             "the threshold; review: the refresh after a "
                                             "model change did (queued, pages nobody)")
    forecast_id: str
    risk: float
    previous_risk: float | None
    threshold: float
    as_of: AwareDatetime
    horizon_ends: AwareDatetime
    expired: bool
    model_name: str
    model_version: str
    previous_model_version: str | None
    acknowledged: bool
    acknowledged_at: AwareDatetime | None
    acknowledged_by: str | None
    reason: str | None


class AlertPage(_Out):
    items: list[AlertItem]
    total: int
    limit: int
    offset: int
    kind: Literal["alert", "review"]
    state: Literal["open", "acknowledged", "all"]


class AcknowledgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000, pattern=r"^[^\x00]*\S[^\x00]*$",
                        description="why (e.g. 'seen; nephrology referral booked')")


class AcknowledgeOut(_Out):
    alert_id: int
    subject_id: int


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
    state: Literal["pending", "running", "done", "failed", "superseded"]
    total: int
    done: int
    worker: str | None
    attempts: int
    verified: bool | None
    created_at: AwareDatetime | None
    started_at: AwareDatetime | None
    finished_at: AwareDatetime | None
    error: str | None


class AccessOut(_Out):
    time: AwareDatetime
    key_name: str | None = Field(description="the API key's name, or the person's user "
                                 "name (then user_id is set)")
    user_id: int | None = Field(default=None, description="the person signed in to the "
                                "pages (None: an API key)")
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
