"""Re-forecast every twin with a newly loaded champion, in chunks.

Each chunk is one write transaction holding its twins' locks, so an ingest for a twin
in the chunk waits and then forecasts with everything the refresh saw (and more).
Features, eligibility and risks are computed for the whole chunk at once.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select

from features.events import EventArrays, events_from_frame
from features.labels import ineligibility_reasons
from serving.core import forecast_out, twin_view
from serving.forecasting import explain
from serving.model_source import LoadedModel
from serving.store.models import Twin
from serving.store.repo import TwinStore, latest_values_of


def refresh_twins(store: TwinStore, model: LoadedModel, job_id: int, chunk: int = 2000) -> int:
    import uuid

    with store.read() as s:
        ids = store.twin_ids(s)
    store.update_refresh(job_id, total=len(ids))
    done = 0
    for lo in range(0, len(ids), chunk):
        part = ids[lo:lo + chunk]
        with store.write() as s:
            q = select(Twin).where(Twin.subject_id.in_(part))
            if not store.sqlite:
                q = q.with_for_update()
            twins = {t.subject_id: t for t in s.execute(q).scalars()}
            frame = store.events_frame(s, part)
            watermark = frame.groupby("subject_id")["recorded_at"].max()
            events = events_from_frame(frame.drop(columns=["recorded_at", "id"]),
                                       source="twin store")
            arrays = EventArrays.from_events(events)
            rows = []
            with_time = [sid for sid in part if twins[sid].last_event_time is not None]
            as_of = {sid: twins[sid].last_event_time for sid in with_time}
            sid_arr = np.array(with_time, dtype=np.int64)
            t_arr = np.array([np.datetime64(as_of[s_], "us").view(np.int64) for s_ in with_time],
                             dtype=np.int64)
            reasons = ineligibility_reasons(arrays, model.bundle.task, sid_arr, t_arr)
            ok = np.array([r is None for r in reasons], dtype=bool)
            risks = x = None
            if ok.any():
                x = model.bundle.features_for(arrays, sid_arr[ok], t_arr[ok])
                risks = model.bundle.predict_features(x)
            k = 0
            for i, sid in enumerate(with_time):
                base = {"forecast_id": str(uuid.uuid4()), "subject_id": int(sid),
                        "as_of": as_of[sid], "watermark": _dt(watermark.get(sid)),
                        "model_name": model.name, "model_version": model.version,
                        "run_id": model.run_id, "feature_spec_digest": model.spec_digest,
                        "task_digest": model.task_digest, "code_version": model.code_version,
                        "requested_by": "system:refresh", "api_key_id": None}
                if reasons[i] is not None:
                    rows.append({**base, "status": "not_eligible", "reason": reasons[i],
                                 "risks": None, "contributions": None, "feature_digest": None})
                    continue
                xi = x[k:k + 1]
                rows.append({**base, "status": "ok", "reason": None,
                             "risks": {f"{h}d": float(r) for h, r in
                                       zip(model.bundle.horizons, risks[k], strict=True)},
                             "contributions": explain(model, xi),
                             "feature_digest": hashlib.sha256(xi.tobytes()).hexdigest()})
                k += 1
            store.add_forecasts(s, rows)
            values = latest_values_of(frame)
            for r in rows:
                twin = twins[r["subject_id"]]
                twin.view = twin_view(twin, values.get(r["subject_id"], []), forecast_out(r))
        done += len(part)
        store.update_refresh(job_id, done=done)
    store.update_refresh(job_id, state="done", finished_at=datetime.now(UTC).replace(tzinfo=None))
    return done


def _dt(value) -> datetime | None:
    if value is None or value != value:
        return None
    return value.to_pydatetime() if hasattr(value, "to_pydatetime") else value
