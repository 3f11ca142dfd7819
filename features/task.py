"""The prediction task: a small YAML file a data scientist writes, validated here.

Example (``examples/tasks/eskd.yaml``)::

    name: eskd
    outcome: {codes: [DX//ESKD]}
    competing: {codes: [MEDS_DEATH]}
    horizons_days: [365, 730]
    prediction_times: {min_gap_days: 180}
    eligibility: {min_history_days: 0}
    features: {windows: [30d, 365d, all], min_code_subjects: 20}
    split: {salt: twincast, train: 0.7, tuning: 0.15, held_out: 0.15}
    promotion: {primary_metric: auroc, margin: 0.0}

Unknown keys, bad values and outcome codes that overlap competing codes are errors that
name the key and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from features.errors import TaskError
from features.events import DEATH_CODE

_PREDICATE = re.compile(
    r"^\s*(?P<code>\S+)\s+(?P<op>below|above|at_most|at_least)\s+(?P<value>[-+0-9.eE]+)\s*$"
)
_WINDOW = re.compile(r"^(?P<n>[1-9][0-9]*)(?P<unit>[dwy])$|^all$")
_UNIT_DAYS = {"d": 1, "w": 7, "y": 365}

NUMERIC_AGGREGATIONS = ("last", "mean", "min", "max", "std", "count", "slope", "days_since_last")
# opt-in per window: a patient's own trajectory (``features.featurize``)
TRAJECTORY_AGGREGATIONS = ("first", "change_since_first", "change_since_previous",
                           "time_weighted_mean", "theil_sen_slope")
CATEGORICAL_AGGREGATIONS = ("ever", "count", "days_since_first")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Predicate(_Strict):
    """``CODE below|above|at_most|at_least VALUE`` on an event's numeric value."""

    code: str
    op: Literal["below", "above", "at_most", "at_least"]
    value: float

    @classmethod
    def parse(cls, text: str) -> Predicate:
        m = _PREDICATE.match(text)
        if not m:
            raise ValueError(
                f"predicate {text!r} is not of the form 'CODE below|above|at_most|at_least "
                "NUMBER', e.g. 'LAB//EGFR below 15'"
            )
        return cls(code=m["code"], op=m["op"], value=float(m["value"]))

    def __str__(self) -> str:
        return f"{self.code} {self.op} {self.value:g}"


class EventDefinition(_Strict):
    """Codes (exact, or glob patterns such as ``DX//ESKD*``) and/or numeric predicates."""

    codes: list[str] = Field(default_factory=list)
    predicates: list[str] = Field(default_factory=list)

    @field_validator("predicates")
    @classmethod
    def _check_predicates(cls, v: list[str]) -> list[str]:
        for text in v:
            Predicate.parse(text)
        return v

    def parsed_predicates(self) -> list[Predicate]:
        return [Predicate.parse(p) for p in self.predicates]

    def is_empty(self) -> bool:
        return not self.codes and not self.predicates

    def matches_code(self, code: str) -> bool:
        """True when ``code`` is one of ``codes`` (predicate codes are not whole codes)."""
        return any(fnmatchcase(code, pattern) for pattern in self.codes)

    def all_codes(self) -> list[str]:
        return [*self.codes, *(p.code for p in self.parsed_predicates())]


class PredictionTimes(_Strict):
    """When predictions are made: at visits, at most one per ``min_gap_days``."""

    at: Literal["each_visit"] = "each_visit"
    min_gap_days: Annotated[float, Field(ge=0)] = 0
    start_after_days: Annotated[float, Field(ge=0)] = 0
    max_per_subject: Annotated[int, Field(ge=1)] | None = None


class Eligibility(_Strict):
    """Who may get a prediction at *t* (alive and outcome-free are always required)."""

    min_history_days: Annotated[float, Field(ge=0)] = 0
    min_visits: Annotated[int, Field(ge=1)] = 1
    min_age_years: Annotated[float, Field(ge=0)] | None = None
    max_age_years: Annotated[float, Field(gt=0)] | None = None


class TrajectorySettings(_Strict):
    """Per numeric code, over all history up to t: an exponentially weighted level and
    trend for each half-life, and a local-linear-trend Kalman filter's level and slope
    (filtering only; its noise variances estimated on the training split, frozen in the
    FeatureSpec)."""

    ewm_half_life_days: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    kalman: bool = False

    @field_validator("ewm_half_life_days")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("half-lives repeat")
        return v


class FeatureSettings(_Strict):
    windows: list[str] = Field(default_factory=lambda: ["30d", "365d", "all"], min_length=1)
    numeric_aggregations: list[Literal[NUMERIC_AGGREGATIONS + TRAJECTORY_AGGREGATIONS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(NUMERIC_AGGREGATIONS), min_length=1
    )
    categorical_aggregations: list[Literal[CATEGORICAL_AGGREGATIONS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(CATEGORICAL_AGGREGATIONS), min_length=1
    )
    min_code_subjects: Annotated[int, Field(ge=1)] = 20
    exclude_codes: list[str] = Field(default_factory=lambda: ["ADMIN//*"])
    units: dict[str, str] = Field(default_factory=dict)
    trajectory: TrajectorySettings | None = None

    @field_validator("windows")
    @classmethod
    def _check_windows(cls, v: list[str]) -> list[str]:
        for w in v:
            if not _WINDOW.match(w):
                raise ValueError(f"window {w!r} is not 'all' or a length such as 30d, 8w, 2y")
        if len(set(v)) != len(v):
            raise ValueError("windows repeat")
        return v

    def window_days(self) -> list[float]:
        """Each window's length in days (``inf`` for ``all``)."""
        out = []
        for w in self.windows:
            m = _WINDOW.match(w)
            out.append(float("inf") if w == "all" else int(m["n"]) * _UNIT_DAYS[m["unit"]])
        return out


class Temporal(_Strict):
    """A temporal hold-out on top of the subject split: train and tuning rows must be
    fully labelled before ``cutoff``; held-out rows are predictions made on or after it."""

    cutoff: date


class SplitSettings(_Strict):
    salt: str = "twincast"
    train: Annotated[float, Field(gt=0, lt=1)] = 0.7
    tuning: Annotated[float, Field(gt=0, lt=1)] = 0.15
    held_out: Annotated[float, Field(gt=0, lt=1)] = 0.15
    temporal: Temporal | None = None
    use_dataset_split: bool = True

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSettings:
        total = self.train + self.tuning + self.held_out
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train + tuning + held_out must be 1, got {total:g}")
        return self


class Promotion(_Strict):
    """The gate a challenger must pass to become champion."""

    primary_metric: Literal["auroc", "auprc", "brier", "uno_c"] = "auroc"
    horizon_days: int | None = None
    margin: Annotated[float, Field(ge=0)] = 0.0
    max_ece: Annotated[float, Field(gt=0)] = 0.05
    calibration_slope: tuple[float, float] = (0.8, 1.2)


class LabelsFile(_Strict):
    """Take prediction times and labels from a MEDS label file (as ACES writes them), or
    from a directory of them; in the ACES layout (``train/``, ``tuning/``, ``held_out/``,
    one file per shard) the directory's split is used as is.  A relative path is found
    beside the task file.  The task still names its outcome (and competing) codes: the
    service and monitoring use them to say what happened after a forecast."""

    path: Path


class ReferenceScore(_Strict):
    """A published score evaluated beside the candidates on the same held-out rows, with
    the same metrics and intervals — never promoted (``training.references``)."""

    name: Literal["kfre4"]
    # the KFRE's baseline risk: recalibrated for North America or for elsewhere
    region: Literal["north_america", "other"] = "north_america"


class MonitoringMargins(_Strict):
    """How far a realised metric may stray from the version's held-out value before it
    alerts (the bootstrap interval of the difference must lie beyond the margin)."""

    auroc: Annotated[float, Field(gt=0)] = 0.05
    brier: Annotated[float, Field(gt=0)] = 0.02
    citl: Annotated[float, Field(gt=0)] = 0.2  # logit scale: odds 1.22 times
    calibration_slope: Annotated[float, Field(gt=0)] = 0.25
    ece: Annotated[float, Field(gt=0)] = 0.03


class Monitoring(_Strict):
    """What ``twincast monitor`` checks and when it alerts (not part of the task's digest:
    thresholds can change without retraining)."""

    window_days: Annotated[int, Field(gt=0)] = 90
    # a realised metric is judged only in windows with this many matured patients and
    # outcome events at the horizon
    min_patients: Annotated[int, Field(ge=10)] = 100
    min_events: Annotated[int, Field(ge=1)] = 10
    margins: MonitoringMargins = Field(default_factory=MonitoringMargins)
    # drift alerts: on the model's top features, PSI above this and above its noise
    # level for the window's size
    psi_threshold: Annotated[float, Field(gt=0)] = 0.1
    top_features: Annotated[int, Field(ge=1)] = 10
    # the family-wise false-alarm rate of one monitoring run
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    # subject-bootstrap replicates per window (the alerts use their standard error,
    # which 100 estimate to within about 7%)
    n_bootstrap: Annotated[int, Field(ge=50)] = 100
    # a forecast made longer than this after its as-of time (a refresh's re-forecast of
    # an old as-of time) is not foresight and is not counted
    max_forecast_delay_days: Annotated[float, Field(ge=0)] = 30.0
    # a forecast matures this long after its horizon ends: outcomes dated just before
    # the end may still be on their way
    outcome_lag_days: Annotated[float, Field(ge=0)] = 30.0
    # drift is measured on at most this many patients per window (a seeded sample)
    drift_sample: Annotated[int, Field(ge=100)] = 20_000


class TrajectoryTarget(_Strict):
    """A numeric code's future value to forecast as quantiles (``training.trajectory``).

    The estimand at prediction time *t* and horizon *H*: the measured value nearest to
    t+H within ``tolerance_days``, among patients alive and free of the outcome (and of
    the competing events) by then — a patient who reaches the outcome or dies has no such
    value, so a trajectory is always read beside the risk of the outcome.  ``quantiles``
    hold 0.5 and mirrored pairs (0.1 with 0.9: an 80% interval), each pair conformalised
    on the tuning split."""

    code: str
    horizons_days: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    quantiles: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9])
    tolerance_days: Annotated[int, Field(gt=0)] = 90
    # the gate: each interval's held-out coverage within this of its nominal level
    max_coverage_error: Annotated[float, Field(gt=0, lt=0.5)] = 0.05

    @field_validator("horizons_days")
    @classmethod
    def _sorted_horizons(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("horizons repeat")
        return sorted(v)

    @field_validator("quantiles")
    @classmethod
    def _mirrored(cls, v: list[float]) -> list[float]:
        q = sorted(round(x, 6) for x in v)
        if len(set(q)) != len(q):
            raise ValueError("quantiles repeat")
        if 0.5 not in q:
            raise ValueError("quantiles must include 0.5 (the median)")
        missing = [x for x in q if x != 0.5 and round(1 - x, 6) not in q]
        if missing:
            raise ValueError(f"quantile {missing[0]} has no mirror {round(1 - missing[0], 6)}:"
                             " intervals are central (0.1 with 0.9 is an 80% interval)")
        return q

    @model_validator(mode="after")
    def _tolerance(self) -> TrajectoryTarget:
        if self.tolerance_days >= self.horizons_days[0]:
            raise ValueError(f"tolerance_days {self.tolerance_days} must be shorter than the "
                             f"shortest horizon {self.horizons_days[0]} (a value at or before "
                             "the prediction time is not a forecast)")
        return self

    @property
    def intervals(self) -> list[tuple[float, float]]:
        """The central intervals' (lower, upper) quantile pairs, widest first."""
        return [(q, round(1 - q, 6)) for q in self.quantiles if q < 0.5]


class WhatIf(_Strict):
    """What-if scenarios (``POST /v1/twins/{id}/what-if``): treatment codes (``RX//…``) a
    clinical client may put in a scenario; auditors and admins may use any code.  Not part
    of the task's digest: a policy, not the model."""

    allowed_codes: list[str] = Field(default_factory=list)


class AlertThreshold(_Strict):
    """A horizon's alert level: a forecast at or above ``threshold`` opens an alert (and
    turns the CDS card "critical"); ``warning`` turns the card "warning" and opens none."""

    horizon_days: Annotated[int, Field(gt=0)]
    threshold: Annotated[float, Field(gt=0, le=1)]
    warning: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _order(self) -> AlertThreshold:
        if self.warning is not None and self.warning >= self.threshold:
            raise ValueError(f"warning {self.warning} must be below threshold "
                             f"{self.threshold}")
        return self


DEFAULT_ALERT = (0.30, 0.10)  # threshold, warning: every horizon of a task that names none


class AlertPolicy(_Strict):
    """When a twin's forecast raises an alert for the care team (``serving.store.risks``).

    A forecast whose risk crosses a horizon's ``threshold`` upward opens one alert per
    twin and horizon; the alert re-arms only once the risk has fallen below ``threshold -
    hysteresis``, so a risk that hovers at the line does not page anyone twice.  The same
    thresholds colour the CDS Hooks cards.  Not part of the task's digest: a policy,
    changed without retraining (it takes effect with the next version served)."""

    hysteresis: Annotated[float, Field(ge=0, lt=1)] = 0.05
    thresholds: list[AlertThreshold] = Field(default_factory=list)

    @field_validator("thresholds")
    @classmethod
    def _unique(cls, v: list[AlertThreshold]) -> list[AlertThreshold]:
        hs = [t.horizon_days for t in v]
        if len(set(hs)) != len(hs):
            raise ValueError("a horizon is listed twice")
        return sorted(v, key=lambda t: t.horizon_days)

    @model_validator(mode="after")
    def _rearms(self) -> AlertPolicy:
        low = [t.horizon_days for t in self.thresholds if t.threshold <= self.hysteresis]
        if low:
            raise ValueError(f"the {low[0]}-day threshold is not above the hysteresis "
                             f"{self.hysteresis}: its alert could never re-arm")
        return self


class Task(_Strict):
    """A validated prediction task."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
    description: str = ""
    outcome: EventDefinition
    competing: EventDefinition = Field(default_factory=lambda: EventDefinition(codes=[DEATH_CODE]))
    horizons_days: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    prediction_times: PredictionTimes = Field(default_factory=PredictionTimes)
    eligibility: Eligibility = Field(default_factory=Eligibility)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    promotion: Promotion = Field(default_factory=Promotion)
    labels: LabelsFile | None = None
    references: list[ReferenceScore] = Field(default_factory=list)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    trajectories: list[TrajectoryTarget] = Field(default_factory=list)
    what_if: WhatIf = Field(default_factory=WhatIf)
    alerts: AlertPolicy = Field(default_factory=AlertPolicy)

    @field_validator("horizons_days")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("horizons repeat")
        return sorted(v)

    @model_validator(mode="after")
    def _check(self) -> Task:
        if self.outcome.is_empty():
            why = (" (a task that reads a MEDS label file still names its outcome, so that "
                   "the service and monitoring can label what happens after a forecast)"
                   if self.labels is not None else "")
            raise ValueError(f"outcome: give at least one code or predicate{why}")
        overlap = sorted(
            {c for c in self.outcome.all_codes() if self.competing.matches_code(c)}
            | {c for c in self.competing.all_codes() if self.outcome.matches_code(c)}
        )
        if overlap:
            raise ValueError(
                f"outcome and competing events overlap on {overlap}; a combined outcome "
                "(e.g. 'death or transplant') has no competing events: set 'competing: {}'"
            )
        h = self.promotion.horizon_days
        if h is not None and h not in self.horizons_days:
            raise ValueError(f"promotion.horizon_days {h} is not one of {self.horizons_days}")
        if self.labels is not None and len(self.horizons_days) != 1:
            raise ValueError("a task that reads a MEDS label file has exactly one horizon")
        codes = [t.code for t in self.trajectories]
        if len(set(codes)) != len(codes):
            raise ValueError("trajectories: a code is listed twice (give it several horizons)")
        for code in codes:
            if self.outcome.matches_code(code) or self.competing.matches_code(code):
                raise ValueError(f"trajectories: {code} is an outcome or competing code")
        unknown = [t.horizon_days for t in self.alerts.thresholds
                   if t.horizon_days not in self.horizons_days]
        if unknown:
            raise ValueError(f"alerts.thresholds: horizon {unknown[0]} is not one of "
                             f"{self.horizons_days}")
        if self.labels is not None and self.promotion.primary_metric == "uno_c":
            raise ValueError("promotion.primary_metric: uno_c needs event times, which a MEDS "
                             "label file does not carry; use auroc, auprc or brier")
        return self

    @property
    def primary_horizon(self) -> int:
        return self.promotion.horizon_days or self.horizons_days[-1]

    def alert_thresholds(self) -> dict[int, AlertThreshold]:
        """Each horizon's alert level: the task's, else 30% (warning 10%) on every
        horizon.  Tasks unpickled from before alerts existed get the default too."""
        policy = getattr(self, "alerts", None) or AlertPolicy()
        if policy.thresholds:
            return {t.horizon_days: t for t in policy.thresholds}
        return {h: AlertThreshold(horizon_days=h, threshold=DEFAULT_ALERT[0],
                                  warning=DEFAULT_ALERT[1]) for h in self.horizons_days}

    @property
    def alert_hysteresis(self) -> float:
        policy = getattr(self, "alerts", None) or AlertPolicy()
        return policy.hysteresis

    def is_excluded_from_features(self, code: str) -> bool:
        """Codes that never become features: excluded patterns, outcome, competing, birth."""
        return (
            any(fnmatchcase(code, p) for p in self.features.exclude_codes)
            or self.outcome.matches_code(code)
            or self.competing.matches_code(code)
        )

    def canonical_json(self) -> str:
        # policies, not the model
        data = self.model_dump(mode="json", exclude={"monitoring", "what_if", "alerts"})
        # tasks written before references and trajectories keep their digest (unpickled
        # older tasks, whose objects lack the fields, dump without them)
        for key in ("references", "trajectories"):
            if not data.get(key):
                data.pop(key, None)
        if data["features"].get("trajectory") is None:
            data["features"].pop("trajectory", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 of the task's canonical JSON (what a model version records)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: the task does not validate:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_task(data: dict, *, source: str = "task") -> Task:
    """Validate a task given as a mapping."""
    if not isinstance(data, dict):
        raise TaskError(f"{source}: a task is a mapping of keys, got {type(data).__name__}")
    try:
        task = Task.model_validate(data)
    except ValidationError as exc:
        raise TaskError(_format_errors(exc, source)) from None
    if task.labels is not None and not task.labels.path.is_absolute() and source != "task":
        # a label file is found relative to the task file that names it
        base = Path(source).parent
        task = task.model_copy(update={"labels": LabelsFile(path=base / task.labels.path)})
    return task


def load_task(path: str | Path) -> Task:
    """Read and validate a task YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file") from None
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {exc}") from None
    return parse_task(data, source=str(path))
