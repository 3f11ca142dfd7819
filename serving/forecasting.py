"""Forecasting a twin: eligibility, the model bundle, contributions in plain words.

The as-of time is the twin's latest event time unless the request sets one (never the
wall clock, which would shift age and days-since features).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from features.describe import describe_feature, describe_value
from features.events import EventArrays, events_from_frame
from features.labels import ineligibility_reason
from serving.model_source import LoadedModel

TOP_CONTRIBUTIONS = 5


@dataclass
class ForecastResult:
    forecast_id: str
    subject_id: int
    as_of: datetime | None
    status: str  # ok | not_eligible
    reason: str | None
    risks: dict[str, float] | None
    contributions: list[dict[str, Any]] | None
    feature_digest: str | None


def _as_us(t: datetime) -> int:
    return int(np.datetime64(t, "us").view(np.int64))


def explain(model: LoadedModel, x: np.ndarray) -> list[dict[str, Any]]:
    """Top contributions for one feature row, with readable names and values."""
    spec = model.bundle.spec
    out = []
    for item in model.bundle.contributions(x, TOP_CONTRIBUTIONS)[0]:
        name = item["feature"]
        code = name.split("__")[0]
        unit = spec.unit_of(code)
        label = describe_feature(name, unit)
        value = describe_value(name, item["value"], unit)
        out.append({**item, "label": label, "value_text": value,
                    "text": f"{label}: {value}, {item['contribution']:+.3f} log-odds "
                            f"(raw model scale) toward {item['horizon_days']}-day risk"})
    return out


def forecast_events(model: LoadedModel, events: pd.DataFrame, subject_id: int,
                    as_of: datetime | None, *, validate: bool = True) -> ForecastResult:
    """Forecast one twin from its events (MEDS frame) at ``as_of`` (default: latest event)."""
    ev = events_from_frame(events[["subject_id", "time", "code", "numeric_value",
                                   "text_value"]], source="twin events") if validate else events
    times = ev["time"].dropna()
    if as_of is None:
        as_of = None if times.empty else times.max().to_pydatetime()
    fid = str(uuid.uuid4())
    if as_of is None:
        return ForecastResult(fid, subject_id, None, "not_eligible",
                              "the twin has no dated events yet", None, None, None)
    arrays = EventArrays.from_events(ev)
    t_us = _as_us(as_of)
    reason = ineligibility_reason(arrays, model.bundle.task, subject_id, t_us)
    if reason is not None:
        return ForecastResult(fid, subject_id, as_of, "not_eligible", reason, None, None, None)
    x = model.bundle.features_for(arrays, np.array([subject_id]), np.array([t_us]))
    risk = model.bundle.predict_features(x)[0]
    risks = {f"{h}d": float(r) for h, r in zip(model.bundle.horizons, risk, strict=True)}
    return ForecastResult(fid, subject_id, as_of, "ok", None, risks, explain(model, x),
                          hashlib.sha256(x.tobytes()).hexdigest())


def forecast_values(model: LoadedModel, result: ForecastResult, watermark: datetime | None,
                    requested_by: str, api_key_id: int | None) -> dict[str, Any]:
    """The store row of a forecast."""
    return {"forecast_id": result.forecast_id, "subject_id": result.subject_id,
            "as_of": result.as_of, "watermark": watermark, "status": result.status,
            "reason": result.reason, "risks": result.risks,
            "contributions": result.contributions, "model_name": model.name,
            "model_version": model.version, "run_id": model.run_id,
            "feature_spec_digest": model.spec_digest, "task_digest": model.task_digest,
            "feature_digest": result.feature_digest, "code_version": model.code_version,
            "requested_by": requested_by, "api_key_id": api_key_id}
