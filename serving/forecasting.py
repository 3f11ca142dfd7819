"""Forecasting twins: eligibility, the model bundle, contributions in plain words.

One function, :func:`forecast_batch`, serves every path — an ingest, a FHIR bundle, a CDS
call, the bulk route, the refresh, the stateless forecast and the audit's replay — for
any number of twins at once, from canonical event arrays.  A twin's numbers depend only
on its own events, so a batch gives each twin what it would get alone.

The as-of time is the twin's latest event time unless the request sets one (never the
wall clock, which would shift age and days-since features).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from features.describe import describe_feature, describe_value
from features.events import NAT_US, EventArrays, shortest_f32
from features.labels import ineligibility_reasons
from serving.model_source import LoadedModel
from serving.store.twins import datetime_of

TOP_CONTRIBUTIONS = 5
NO_DATED_EVENTS = "the twin has no dated events yet"


@dataclass
class ForecastResult:
    forecast_id: str
    subject_id: int
    as_of: datetime | None  # naive UTC
    status: str  # ok | not_eligible
    reason: str | None
    risks: dict[str, float] | None
    contributions: list[dict[str, Any]] | None
    feature_digest: str | None
    trajectories: list[dict[str, Any]] | None = None


def _us(t: datetime) -> int:
    return int(np.datetime64(t, "us").view(np.int64))


def latest_times(arrays: EventArrays, subject_ids: np.ndarray) -> np.ndarray:
    """Each subject's latest dated event (µs; ``NAT_US`` when it has none)."""
    out = np.full(subject_ids.size, NAT_US, dtype=np.int64)
    dated = arrays.time_us != NAT_US
    if not dated.any():
        return out
    sid, t = arrays.subject_id[dated], arrays.time_us[dated]
    order = np.lexsort((t, sid))
    sid, t = sid[order], t[order]
    last = np.r_[sid[1:] != sid[:-1], True]
    u_sid, u_t = sid[last], t[last]
    pos = np.searchsorted(u_sid, subject_ids)
    pos_c = np.minimum(pos, u_sid.size - 1)
    hit = u_sid[pos_c] == subject_ids
    out[hit] = u_t[pos_c[hit]]
    return out


def forecast_batch(model: LoadedModel, arrays: EventArrays, subject_ids: list[int],
                   as_of: list[datetime | None], *, explain_rows: bool = True
                   ) -> list[ForecastResult]:
    """Forecasts for twins (``as_of`` naive UTC, None: each twin's latest event);
    ``explain_rows=False`` leaves out the contributions (a what-if shows none)."""
    sids = np.asarray(subject_ids, dtype=np.int64)
    t = latest_times(arrays, sids)
    for i, a in enumerate(as_of):
        if a is not None:
            t[i] = _us(a)
    dated = t != NAT_US
    reasons: list[str | None] = [NO_DATED_EVENTS] * sids.size
    if dated.any():
        for i, r in zip(np.flatnonzero(dated), ineligibility_reasons(
                arrays, model.bundle.task, sids[dated], t[dated]), strict=True):
            reasons[i] = r
    ok = np.array([r is None for r in reasons], dtype=bool)
    x = risks = None
    contributions: list[list[dict[str, Any]]] = []
    paths: list[list[dict[str, Any]] | None] = []
    if ok.any():
        x = model.bundle.features_for(arrays, sids[ok], t[ok])
        risks = model.bundle.predict_features(x)
        contributions = explain(model, x) if explain_rows else [None] * x.shape[0]
        paths = trajectories(model, x)
    horizons = model.bundle.horizons
    out, k = [], 0
    for i in range(sids.size):
        when = datetime_of(t[i]) if dated[i] else None
        fid = str(uuid.uuid4())
        if not ok[i]:
            out.append(ForecastResult(fid, int(sids[i]), when, "not_eligible", reasons[i],
                                      None, None, None))
            continue
        out.append(ForecastResult(
            fid, int(sids[i]), when, "ok", None,
            {f"{h}d": float(r) for h, r in zip(horizons, risks[k], strict=True)},
            contributions[k], hashlib.sha256(x[k:k + 1].tobytes()).hexdigest(), paths[k]))
        k += 1
    return out


def trajectories(model: LoadedModel, x: np.ndarray) -> list[list[dict[str, Any]] | None]:
    """Per feature row, the bundle's trajectories (None when the model has none): the
    median and each central interval, in the code's unit, conditional on survival free
    of the outcome (``features.targets``)."""
    fitted = model.bundle.trajectory_models
    if not fitted:
        return [None] * x.shape[0]
    outcome = ", ".join(model.bundle.task.outcome.all_codes()) or "the outcome"
    preds = model.bundle.predict_trajectories(x)
    out = []
    for r in range(x.shape[0]):
        items = []
        for t, q in zip(fitted, preds, strict=True):
            row = shortest_f32(q[r].astype(np.float32))  # 41.2, not 41.19999885559082
            at = dict(zip(t.quantiles, row, strict=True))
            items.append({
                "code": t.code, "unit": t.unit, "horizon_days": t.horizon_days,
                "median": at[0.5],
                "intervals": [{"level": round(hi - lo, 6), "lower": at[lo], "upper": at[hi]}
                              for lo, hi in sorted((q_, round(1 - q_, 6)) for q_ in
                                                   t.quantiles if q_ < 0.5)],  # widest first
                "tolerance_days": t.tolerance_days,
                "conditional_on": f"alive and free of {outcome} at the horizon",
            })
        out.append(items)
    return out


def explain(model: LoadedModel, x: np.ndarray) -> list[list[dict[str, Any]]]:
    """Top contributions for each feature row, with readable names and values."""
    spec = model.bundle.spec
    out = []
    labels = model.feature_labels  # per feature name: (unit, label), kept with the model
    for row in model.bundle.contributions(x, TOP_CONTRIBUTIONS):
        items = []
        for item in row:
            name = item["feature"]
            if name not in labels:
                unit = spec.unit_of(name.split("__")[0])
                labels[name] = (unit, describe_feature(name, unit))
            unit, label = labels[name]
            value = describe_value(name, item["value"], unit)
            items.append({**item, "label": label, "value_text": value,
                          "text": f"{label}: {value}, {item['contribution']:+.3f} log-odds "
                                  f"(raw model scale) toward {item['horizon_days']}-day risk"})
        out.append(items)
    return out


def forecast_values(model: LoadedModel, result: ForecastResult, watermark: datetime | None,
                    requested_by: str, api_key_id: int | None) -> dict[str, Any]:
    """The store row of a forecast (a non-finite number is refused: JSON cannot hold
    it, and the row's digest must hash what is stored)."""
    numbers = [*(result.risks or {}).values(),
               *(c["contribution"] for c in result.contributions or ()),
               *(v for t in result.trajectories or () for v in
                 (t["median"], *(b for i in t["intervals"] for b in (i["lower"], i["upper"]))))]
    if not all(v is not None and math.isfinite(v) for v in numbers):
        raise ValueError(f"the model gave a non-finite risk or contribution for twin "
                         f"{result.subject_id}")
    return {"forecast_id": result.forecast_id, "subject_id": result.subject_id,
            "as_of": result.as_of, "watermark": watermark, "status": result.status,
            "reason": result.reason, "risks": result.risks,
            "contributions": result.contributions, "trajectories": result.trajectories,
            "model_name": model.name,
            "model_version": model.version, "run_id": model.run_id,
            "feature_spec_digest": model.spec_digest, "task_digest": model.task_digest,
            "feature_digest": result.feature_digest, "code_version": model.code_version,
            "requested_by": requested_by, "api_key_id": api_key_id}
