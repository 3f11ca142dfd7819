"""The twin store: what the service reads and writes, as plain functions of a session.

Patient data stays in the database: nothing here logs values.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from serving.errors import Conflict, NotFound
from serving.store.db import is_sqlite, make_engine, write_transaction
from serving.store.models import (
    AccessLog,
    ApiKey,
    Event,
    Forecast,
    Identifier,
    ModelLoad,
    RefreshJob,
    Twin,
)

ROLES = ("clinical", "auditor", "admin")
ACCESS_FLUSH_SECONDS = 0.2
KEY_PREFIX = "tc_"


def utcnow() -> datetime:
    """Naive UTC, as stored."""
    return datetime.now(UTC).replace(tzinfo=None)


def _hash_key(token: str) -> str:
    # keys are 256-bit random tokens: a plain SHA-256 is a safe, fast lookup hash
    return hashlib.sha256(token.encode()).hexdigest()


def idempotency_key(subject_id: int, time: datetime | None, code: str, value: float | None,
                    text: str | None, client_id: str | None) -> str:
    """The client's event id, else a hash of subject, time, code and value."""
    if client_id:
        return "id:" + client_id[:120]
    raw = json.dumps([subject_id, time.isoformat() if time else None, code,
                      None if value is None else repr(float(value)), text])
    return "h:" + hashlib.sha256(raw.encode()).hexdigest()[:64]


@dataclass(frozen=True)
class EventRow:
    time: datetime | None
    code: str
    numeric_value: float | None
    text_value: str | None
    client_id: str | None = None
    source: str | None = None


FORECAST_DIGEST_FIELDS = (
    "forecast_id", "subject_id", "as_of", "watermark", "status", "reason", "risks",
    "contributions", "model_name", "model_version", "run_id", "feature_spec_digest",
    "task_digest", "feature_digest", "code_version", "requested_by", "api_key_id",
    "created_at")


def forecast_digest(values: dict[str, Any]) -> str:
    """SHA-256 over a forecast row's content (tamper evidence)."""
    def norm(v):
        return v.isoformat() if isinstance(v, datetime) else v
    payload = {k: norm(values.get(k)) for k in FORECAST_DIGEST_FIELDS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


class TwinStore:
    """Twins, events, forecasts, keys, access log and service state."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.sqlite = is_sqlite(self.engine)
        self.auth_cache_seconds = 10.0
        self._access_queue: list[dict[str, Any]] = []
        self._access_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._access_thread: threading.Thread | None = None
        self._auth_cache: dict[str, tuple[ApiKey | None, float]] = {}

    def dispose(self) -> None:
        self.flush_access_log()
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions
    def write(self):
        """A write transaction (commit on success, roll back on any error)."""
        return write_transaction(self.sessions, sqlite=self.sqlite)

    def read(self) -> Session:
        return self.sessions()

    # ------------------------------------------------------------------ twins
    def lock_twin(self, s: Session, subject_id: int, *, create: bool) -> Twin | None:
        """The twin's row, locked for this transaction (created when asked)."""
        now = utcnow()
        if create:
            ins = (sqlite_insert if self.sqlite else pg_insert)(Twin).values(
                subject_id=subject_id, created_at=now, updated_at=now, event_count=0)
            s.execute(ins.on_conflict_do_nothing(index_elements=["subject_id"]))
        q = select(Twin).where(Twin.subject_id == subject_id)
        if not self.sqlite:
            q = q.with_for_update()
        return s.execute(q).scalar_one_or_none()

    def get_twin(self, s: Session, subject_id: int) -> Twin:
        twin = s.get(Twin, subject_id)
        if twin is None:
            raise NotFound(f"no twin with subject_id {subject_id}")
        return twin

    def twin_ids(self, s: Session) -> list[int]:
        return list(s.execute(select(Twin.subject_id).order_by(Twin.subject_id)).scalars())

    def subject_for_identifier(self, s: Session, system: str, value: str, *,
                               create: bool) -> int | None:
        """The twin behind an external identifier; a new one (an unused id) on first sight."""
        found = s.execute(select(Identifier.subject_id).where(
            Identifier.system == system, Identifier.value == value)).scalar_one_or_none()
        if found is not None or not create:
            return found
        top = s.execute(select(func.max(Twin.subject_id))).scalar_one_or_none() or 0
        subject_id = int(top) + 1
        self.lock_twin(s, subject_id, create=True)
        s.add(Identifier(system=system, value=value, subject_id=subject_id, created_at=utcnow()))
        s.flush()
        return subject_id

    def link_identifier(self, s: Session, system: str, value: str, subject_id: int) -> None:
        """Map another external identifier to a twin (no-op when already mapped)."""
        if self.subject_for_identifier(s, system, value, create=False) is None:
            s.add(Identifier(system=system, value=value, subject_id=subject_id,
                             created_at=utcnow()))
            s.flush()

    # ------------------------------------------------------------------ events
    def add_events(self, s: Session, twin: Twin, rows: Iterable[EventRow], *,
                   source: str | None = None) -> tuple[int, int]:
        """Insert events not seen before (by idempotency key); returns (added, duplicates)."""
        now = utcnow()
        rows = list(rows)
        keys = [idempotency_key(twin.subject_id, r.time, r.code, r.numeric_value, r.text_value,
                                r.client_id) for r in rows]
        existing = set(s.execute(select(Event.idempotency_key).where(
            Event.subject_id == twin.subject_id, Event.idempotency_key.in_(keys))).scalars())
        fresh, seen = [], set()
        for r, k in zip(rows, keys, strict=True):
            if k in existing or k in seen:
                continue
            seen.add(k)
            fresh.append({"subject_id": twin.subject_id, "time": r.time, "code": r.code,
                          "numeric_value": r.numeric_value, "text_value": r.text_value,
                          "recorded_at": now, "idempotency_key": k,
                          "source": r.source or source})
        if fresh:
            s.execute(insert(Event), fresh)
            times = [r["time"] for r in fresh if r["time"] is not None]
            if times and (twin.last_event_time is None or max(times) > twin.last_event_time):
                twin.last_event_time = max(times)
            twin.event_count = (twin.event_count or 0) + len(fresh)
            twin.updated_at = now
        return len(fresh), len(rows) - len(fresh)

    def events_frame(self, s: Session, subject_ids: list[int] | int,
                     recorded_upto: datetime | None = None) -> pd.DataFrame:
        """Events of twins as a MEDS frame (optionally only those received by a time)."""
        ids = [subject_ids] if isinstance(subject_ids, int) else list(subject_ids)
        q = select(Event.subject_id, Event.time, Event.code, Event.numeric_value,
                   Event.text_value, Event.recorded_at, Event.id).where(
            Event.subject_id.in_(ids))
        if recorded_upto is not None:
            q = q.where(Event.recorded_at <= recorded_upto)
        rows = s.execute(q).all()
        frame = pd.DataFrame(rows, columns=["subject_id", "time", "code", "numeric_value",
                                            "text_value", "recorded_at", "id"])
        frame["subject_id"] = frame["subject_id"].astype(np.int64)
        frame["time"] = pd.to_datetime(frame["time"]).astype("datetime64[us]")
        frame["numeric_value"] = pd.to_numeric(frame["numeric_value"]).astype(np.float64)
        frame["text_value"] = frame["text_value"].astype(object)
        frame["recorded_at"] = pd.to_datetime(frame["recorded_at"]).astype("datetime64[us]")
        return frame

    def latest_values(self, s: Session, subject_id: int) -> list[dict[str, Any]]:
        """Each code's latest event (the twin's current values)."""
        return latest_values_of(self.events_frame(s, subject_id)).get(subject_id, [])

    # ------------------------------------------------------------------ forecasts
    def add_forecast(self, s: Session, values: dict[str, Any]) -> Forecast:
        values = {**values, "created_at": values.get("created_at") or utcnow()}
        values["row_digest"] = forecast_digest(values)
        row = Forecast(**values)
        s.add(row)
        s.flush()
        return row

    def add_forecasts(self, s: Session, rows: list[dict[str, Any]]) -> None:
        now = utcnow()
        for r in rows:
            r.setdefault("created_at", now)
            r["row_digest"] = forecast_digest(r)
        if rows:
            s.execute(insert(Forecast), rows)

    def latest_forecast(self, s: Session, subject_id: int) -> Forecast | None:
        return s.execute(select(Forecast).where(Forecast.subject_id == subject_id)
                         .order_by(Forecast.seq.desc()).limit(1)).scalar_one_or_none()

    def forecasts(self, s: Session, subject_id: int, limit: int, offset: int
                  ) -> tuple[list[Forecast], int]:
        total = s.execute(select(func.count()).select_from(Forecast)
                          .where(Forecast.subject_id == subject_id)).scalar_one()
        rows = s.execute(select(Forecast).where(Forecast.subject_id == subject_id)
                         .order_by(Forecast.seq.desc()).limit(limit).offset(offset)).scalars()
        return list(rows), int(total)

    def forecast_by_id(self, s: Session, forecast_id: str) -> Forecast:
        row = s.execute(select(Forecast).where(Forecast.forecast_id == forecast_id)
                        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no forecast {forecast_id}")
        return row

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str, role: str) -> str:
        """Create an API key; the secret is returned once and only its hash is stored."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.write() as s:
                s.add(ApiKey(name=name, role=role, key_hash=_hash_key(token),
                             prefix=token[:10], created_at=utcnow()))
        except IntegrityError:
            raise Conflict(f"an API key named {name!r} exists already") from None
        return token

    def list_keys(self) -> list[ApiKey]:
        with self.read() as s:
            return list(s.execute(select(ApiKey).order_by(ApiKey.id)).scalars())

    def revoke_key(self, name: str) -> None:
        with self.write() as s:
            done = s.execute(update(ApiKey).where(ApiKey.name == name,
                                                  ApiKey.revoked_at.is_(None))
                             .values(revoked_at=utcnow())).rowcount
        self._auth_cache.clear()
        if not done:
            raise NotFound(f"no active API key named {name!r}")

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key for a token.  Answers are cached for ``auth_cache_seconds``
        (a revoked key stops working within that time; 0 disables the cache)."""
        digest = _hash_key(token)
        now = time.monotonic()
        hit = self._auth_cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self.read() as s:
            key = s.execute(select(ApiKey).where(ApiKey.key_hash == digest,
                                                 ApiKey.revoked_at.is_(None))
                            ).scalar_one_or_none()
        if self.auth_cache_seconds > 0:
            if len(self._auth_cache) > 10_000:
                self._auth_cache.clear()
            self._auth_cache[digest] = (key, now + self.auth_cache_seconds)
        return key

    # ------------------------------------------------------------------ access log
    def log_access(self, s: Session | None, *, key: ApiKey | None, method: str, path: str,
                   action: str, subject_id: int | None, status_code: int) -> None:
        """Append to the access log: in ``s``'s transaction, or queued for the batch
        writer (flushed within ``ACCESS_FLUSH_SECONDS``, and before the log is read)."""
        row = {"time": utcnow(), "api_key_id": key.id if key else None,
               "key_name": key.name if key else None, "role": key.role if key else None,
               "method": method, "path": path[:512], "action": action,
               "subject_id": subject_id, "status_code": status_code}
        if s is not None:
            s.execute(insert(AccessLog), [row])
            return
        with self._access_lock:
            self._access_queue.append(row)
            start = self._access_thread is None
            if start:
                self._access_thread = threading.Thread(target=self._access_loop,
                                                       name="access-log", daemon=True)
        if start:
            self._access_thread.start()
            atexit.register(self.flush_access_log)

    def _access_loop(self) -> None:
        while True:
            time.sleep(ACCESS_FLUSH_SECONDS)
            try:
                self.flush_access_log()
            except Exception:
                logging.getLogger("twincast.access").exception("access log flush failed")

    def flush_access_log(self) -> int:
        """Write every queued access-log row in one transaction."""
        with self._flush_lock:
            with self._access_lock:
                rows, self._access_queue = self._access_queue, []
            if not rows:
                return 0
            try:
                with self.write() as w:
                    w.execute(insert(AccessLog), rows)
            except Exception:
                with self._access_lock:  # keep them for the next attempt
                    self._access_queue[:0] = rows
                raise
            return len(rows)

    def access_log(self, s: Session, subject_id: int | None, limit: int) -> list[AccessLog]:
        self.flush_access_log()
        q = select(AccessLog).order_by(AccessLog.id.desc()).limit(limit)
        if subject_id is not None:
            q = q.where(AccessLog.subject_id == subject_id)
        return list(s.execute(q).scalars())

    # ------------------------------------------------------------------ service state
    def record_model_load(self, name: str, version: str, run_id: str, worker: str,
                          reason: str) -> None:
        with self.write() as s:
            s.add(ModelLoad(time=utcnow(), model_name=name, model_version=version,
                            run_id=run_id, worker=worker, reason=reason))

    def claim_refresh(self, name: str, version: str, worker: str) -> int | None:
        """Start the refresh job for a model version, unless some worker already did."""
        try:
            with self.write() as s:
                job = RefreshJob(model_name=name, model_version=version, state="running",
                                 total=0, done=0, worker=worker, started_at=utcnow())
                s.add(job)
                s.flush()
                return job.id
        except IntegrityError:
            return None

    def update_refresh(self, job_id: int, **values: Any) -> None:
        with self.write() as s:
            s.execute(update(RefreshJob).where(RefreshJob.id == job_id).values(**values))

    def latest_refresh(self) -> RefreshJob | None:
        with self.read() as s:
            return s.execute(select(RefreshJob).order_by(RefreshJob.id.desc()).limit(1)
                             ).scalar_one_or_none()


def latest_values_of(frame: pd.DataFrame) -> dict[int, list[dict[str, Any]]]:
    """Each twin's latest event per code (by time, then arrival) from an events frame as
    ``events_frame`` returns it — no second query for what a caller already loaded."""
    if frame.empty:
        return {}
    f = frame.assign(_timed=frame["time"].notna()).sort_values(
        ["subject_id", "code", "_timed", "time", "id"], na_position="first", kind="stable")
    last = f.drop_duplicates(["subject_id", "code"], keep="last")
    out: dict[int, list[dict[str, Any]]] = {}
    for r in last.itertuples(index=False):
        out.setdefault(int(r.subject_id), []).append({
            "code": r.code, "time": None if pd.isna(r.time) else r.time.to_pydatetime(),
            "numeric_value": None if pd.isna(r.numeric_value) else float(r.numeric_value),
            "text_value": r.text_value if isinstance(r.text_value, str) else None})
    return out


def import_events(store: TwinStore, events: pd.DataFrame, *, source: str = "import",
                  batch: int = 50_000) -> tuple[int, int]:
    """Bulk-load canonical MEDS events into twins (new twins only; one transaction).

    Returns (twins, events) added.  Twins that exist already are left alone: send their
    new events through the API, which also re-forecasts them.
    """
    now = utcnow()
    with store.write() as s:
        have = set(store.twin_ids(s))
        ev = events[~events["subject_id"].isin(list(have))]
        if ev.empty:
            return 0, 0
        g = ev.groupby("subject_id", sort=True)
        last = g["time"].max()
        n = g.size()
        s.execute(insert(Twin), [
            {"subject_id": int(k), "created_at": now, "updated_at": now,
             "last_event_time": None if pd.isna(last[k]) else last[k].to_pydatetime(),
             "event_count": int(n[k])} for k in n.index])
        rows = []
        text = ev["text_value"].to_numpy(dtype=object)
        for i, r in enumerate(ev.itertuples(index=False)):
            t = None if pd.isna(r.time) else r.time.to_pydatetime()
            v = None if r.numeric_value != r.numeric_value else float(r.numeric_value)
            tv = text[i] if isinstance(text[i], str) else None
            rows.append({"subject_id": int(r.subject_id), "time": t, "code": str(r.code),
                         "numeric_value": v, "text_value": tv, "recorded_at": now,
                         "idempotency_key": idempotency_key(int(r.subject_id), t, str(r.code),
                                                            v, tv, None), "source": source})
            if len(rows) == batch:
                s.execute(insert(Event), rows)
                rows = []
        if rows:
            s.execute(insert(Event), rows)
    return int(n.size), len(ev)


def open_store(url: str, *, migrate: bool = True) -> TwinStore:
    from serving.store.db import upgrade

    store = TwinStore(url)
    if migrate:
        upgrade(store.engine)
    return store

