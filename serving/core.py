"""The twin service's operations, independent of HTTP (routes call these, one each).

Holds the store and the served model; watches the ``champion`` alias; re-forecasts every
twin once (under a database claim) when a new champion is loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from features.errors import DataValidationError
from serving.errors import BadInput, NotReady
from serving.forecasting import forecast_events, forecast_values
from serving.model_source import LoadedModel, ModelSource
from serving.store.db import worker_name
from serving.store.models import ApiKey, Forecast
from serving.store.repo import EventRow, TwinStore, latest_values_of

log = logging.getLogger("twincast.service")


def naive_utc(t: datetime | None) -> datetime | None:
    return None if t is None else t.astimezone(UTC).replace(tzinfo=None)


def aware(t: datetime | None) -> datetime | None:
    return None if t is None else t.replace(tzinfo=UTC)


def forecast_out(row: Forecast | dict[str, Any], stored: bool = True) -> dict[str, Any]:
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    return {"forecast_id": get("forecast_id"), "subject_id": get("subject_id"),
            "as_of": aware(get("as_of")), "status": get("status"), "reason": get("reason"),
            "risks": get("risks"), "contributions": get("contributions"),
            "model": {"name": get("model_name"), "version": get("model_version"),
                      "run_id": get("run_id")},
            "watermark": aware(get("watermark")), "created_at": aware(get("created_at")),
            "stored": stored}


def _frame(subject_id: int, events: list) -> pd.DataFrame:
    return pd.DataFrame({
        "subject_id": np.full(len(events), subject_id, dtype=np.int64),
        "time": pd.Series([naive_utc(e.time) for e in events], dtype="datetime64[us]"),
        "code": [e.code for e in events],
        "numeric_value": np.array([np.nan if e.numeric_value is None else e.numeric_value
                                   for e in events], dtype=np.float64),
        "text_value": pd.Series([e.text_value for e in events], dtype=object),
    })


@dataclass
class Caller:
    key: ApiKey | None

    @property
    def name(self) -> str:
        return self.key.name if self.key else "system"

    @property
    def key_id(self) -> int | None:
        return self.key.id if self.key else None


class TwinCore:
    def __init__(self, store: TwinStore, source: ModelSource, *, poll_seconds: float = 30.0,
                 refresh_chunk: int = 2000):
        self.store = store
        self.source = source
        self.poll_seconds = poll_seconds
        self.refresh_chunk = refresh_chunk
        self.model: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.worker = worker_name()
        self.cds_clients: dict[str, dict[str, Any]] = {}
        self.cds_thresholds: tuple[float, float] = (0.10, 0.30)

    # ------------------------------------------------------------------ model
    def start(self) -> None:
        """Load the champion (if any), then watch its alias in the background."""
        try:
            self.reload(reason="start", refresh=True)
        except NotReady as exc:
            log.warning("%s", exc)
        if self.poll_seconds > 0:
            self._watcher = threading.Thread(target=self._watch, name="champion-watch",
                                             daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                current = self.source.champion_version()
                if current is not None and (self.model is None or current != self.model.version):
                    self.reload(reason="champion alias moved", refresh=True)
            except Exception:
                log.exception("checking the champion alias failed")

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise NotReady(f"no model loaded: {self.source.name} has no champion yet")
        return self.model

    def reload(self, *, reason: str = "admin reload", refresh: bool = True) -> dict[str, Any]:
        """Load the current champion; when it changed, re-forecast every twin (background)."""
        with self._lock:
            before = self.model.version if self.model else None
            version = self.source.champion_version()
            if version is None:
                raise NotReady(f"{self.source.name} has no champion yet")
            changed = version != before
            if changed:
                model = self.source.load(version)
                self.model = model
                self.store.record_model_load(model.name, model.version, model.run_id,
                                             self.worker, reason)
                log.info("serving %s version %s (%s)", model.name, model.version, reason)
        job = None
        if changed and refresh:
            job_id = self.store.claim_refresh(self.model.name, self.model.version, self.worker)
            if job_id is not None:
                threading.Thread(target=self.refresh_all, args=(job_id, self.model),
                                 name="refresh", daemon=True).start()
            job = self.refresh_status()
        return {"previous_version": before, "version": self.model.version, "changed": changed,
                "refresh": job}

    def model_info(self) -> dict[str, Any]:
        return self.require_model().describe()

    # ------------------------------------------------------------------ twins
    def ingest(self, subject_id: int, events: list, as_of: datetime | None,
               caller: Caller) -> dict[str, Any]:
        """Store new events and the twin's new forecast in one transaction."""
        model = self.require_model()
        rows = [EventRow(naive_utc(e.time), e.code, e.numeric_value, e.text_value, e.event_id)
                for e in events]
        _frame_checked(subject_id, events)
        with self.store.write() as s:
            twin = self.store.lock_twin(s, subject_id, create=True)
            added, dupes = self.store.add_events(s, twin, rows, source=caller.name)
            if added == 0 and as_of is None:
                latest = self.store.latest_forecast(s, subject_id)
                if latest is not None and latest.model_version == model.version:
                    # a re-sent batch changes nothing: the current forecast stands
                    return {"added": 0, "duplicates": dupes, "forecast": forecast_out(latest)}
            frame = self.store.events_frame(s, subject_id)
            watermark = frame["recorded_at"].max().to_pydatetime() if len(frame) else None
            result = _forecast(model, frame, subject_id, naive_utc(as_of))
            values = forecast_values(model, result, watermark, caller.name, caller.key_id)
            row = self.store.add_forecast(s, values)
            out = forecast_out(row)
            twin.view = twin_view(twin, latest_values_of(frame).get(subject_id, []), out)
        return {"added": added, "duplicates": dupes, "forecast": out}

    def twin(self, subject_id: int) -> str:
        """The twin's current state as JSON: one primary-key read of its kept view."""
        with self.store.read() as s:
            twin = self.store.get_twin(s, subject_id)
            if twin.view:
                return twin.view
            latest = self.store.latest_forecast(s, subject_id)
            values = self.store.latest_values(s, subject_id)
            return twin_view(twin, values, forecast_out(latest) if latest else None)

    def forecasts(self, subject_id: int, limit: int, offset: int) -> dict[str, Any]:
        with self.store.read() as s:
            self.store.get_twin(s, subject_id)
            rows, total = self.store.forecasts(s, subject_id, limit, offset)
            return {"items": [forecast_out(r) for r in rows], "total": total, "limit": limit,
                    "offset": offset}

    def stateless(self, subject_id: int, events: list, as_of: datetime | None) -> dict[str, Any]:
        model = self.require_model()
        frame = _frame_checked(subject_id, events)
        result = _forecast(model, frame, subject_id, naive_utc(as_of))
        values = forecast_values(model, result, None, "stateless", None)
        return forecast_out(values, stored=False)

    # ------------------------------------------------------------------ refresh
    def refresh_status(self) -> dict[str, Any] | None:
        job = self.store.latest_refresh()
        if job is None:
            return None
        return {"model_name": job.model_name, "model_version": job.model_version,
                "state": job.state, "total": job.total, "done": job.done,
                "started_at": aware(job.started_at), "finished_at": aware(job.finished_at),
                "error": job.error}

    def refresh_all(self, job_id: int, model: LoadedModel) -> None:
        """Re-forecast every twin with ``model``, chunk by chunk under the twins' locks."""
        from serving.refresh import refresh_twins

        try:
            refresh_twins(self.store, model, job_id, self.refresh_chunk)
        except Exception as exc:
            log.exception("refresh failed")
            self.store.update_refresh(job_id, state="failed", error=type(exc).__name__,
                                      finished_at=datetime.now(UTC).replace(tzinfo=None))


def twin_view(twin, values: list[dict[str, Any]], forecast: dict[str, Any] | None) -> str:
    """The JSON body of GET /v1/twins/{id}."""
    from serving.api.schemas import TwinOut

    return TwinOut.model_validate({
        "subject_id": twin.subject_id, "created_at": aware(twin.created_at),
        "last_event_time": aware(twin.last_event_time), "event_count": twin.event_count,
        "latest_values": [{**v, "time": aware(v["time"])} for v in values],
        "forecast": forecast}).model_dump_json()


def _frame_checked(subject_id: int, events: list) -> pd.DataFrame:
    frame = _frame(subject_id, events)
    try:
        from features.events import events_from_frame

        events_from_frame(frame.copy(), source="request")
    except DataValidationError as exc:
        raise BadInput(exc.detail, ["body", "events", exc.row or 0, exc.column or ""]) from None
    return frame


def _forecast(model: LoadedModel, frame: pd.DataFrame, subject_id: int,
              as_of: datetime | None):
    try:
        return forecast_events(model, frame, subject_id, as_of)
    except DataValidationError as exc:
        raise BadInput(exc.detail, ["body", "events"]) from None


def wait_for_refresh(core: TwinCore, timeout: float = 60.0) -> dict[str, Any] | None:
    """Block until the latest refresh job ends (tests and the CLI use this)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = core.refresh_status()
        if job is None or job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    return core.refresh_status()
