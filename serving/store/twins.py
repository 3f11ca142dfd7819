"""Twins, their events, forecasts and views: plain functions of a session, batch-first.

Patient data stays in the database: nothing here logs values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_str
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from features.events import EventArrays
from serving.store.models import Event, Forecast, Twin

KEY_CHUNK = 20_000  # bound parameters per query
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value", "recorded_at",
                 "idempotency_key", "source")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # MEDS stores values as float32


def storable(value: float | None) -> bool:
    """Whether a numeric value can be stored: null, or finite within float32.

    >>> storable(None), storable(1e30), storable(1e300), storable(float("nan"))
    (True, True, False, False)
    """
    return value is None or -FLOAT32_MAX <= value <= FLOAT32_MAX


def utcnow() -> datetime:
    """Naive UTC, as stored."""
    return datetime.now(UTC).replace(tzinfo=None)


def idempotency_key(subject_id: int, time: datetime | None, code: str, value: float | None,
                    text: str | None, client_id: str | None) -> str:
    """The client's event id, else a hash of subject, time, code and value."""
    if client_id:
        return "id:" + client_id[:120]
    # exactly json.dumps([subject_id, time ISO, code, repr(value), text]) — the format
    # stored keys were made with — at a third of its cost (the bulk route's hot loop)
    raw = (f"[{int(subject_id)}, {_json_str(time.isoformat()) if time else 'null'}, "
           f"{_json_str(code)}, {'null' if value is None else _json_str(repr(float(value)))}"
           f", {'null' if text is None else _json_str(text)}]")
    return "h:" + hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event as the write path takes it: times naive UTC, values already checked."""

    time: datetime | None
    code: str
    numeric_value: float | None
    text_value: str | None
    client_id: str | None = None
    source: str | None = None


@dataclass(slots=True)
class TwinRow:
    """A locked twin's row as the write path needs it."""

    subject_id: int
    created_at: datetime
    last_event_time: datetime | None
    event_count: int
    model_name: str | None
    model_version: str | None
    view: str | None
    forecast_head: str | None = None  # digest of the twin's latest forecast row
    created: bool = False


TWIN_COLUMNS = ("subject_id, created_at, last_event_time, event_count, model_name, "
                "model_version, view, forecast_head")  # TwinRow's fields, in order


def _stored_time(text: str | None) -> datetime | None:
    """A time as SQLite holds it (SQLAlchemy's text form of naive UTC)."""
    return None if text is None else datetime.fromisoformat(text)


def _same(value):
    return value


FORECAST_DIGEST_FIELDS = (
    "forecast_id", "subject_id", "as_of", "watermark", "status", "reason", "risks",
    "contributions", "model_name", "model_version", "run_id", "feature_spec_digest",
    "task_digest", "feature_digest", "code_version", "requested_by", "api_key_id",
    "created_at")


DIGEST_VERSION = 2  # 1: the row alone; 2: the row and its twin's previous row's digest


def forecast_digest(values: dict[str, Any]) -> str:
    """SHA-256 over a forecast row's content (tamper evidence).  From version 2 it also
    covers ``prev_digest``, the digest of the twin's previous forecast row, so each
    twin's forecasts form a chain: a row altered, re-digested or deleted breaks the
    link to the next one."""
    def norm(v):
        return v.isoformat() if isinstance(v, datetime) else v
    payload = {k: norm(values.get(k)) for k in FORECAST_DIGEST_FIELDS}
    if (values.get("digest_version") or 1) >= 2:
        payload["prev_digest"] = values.get("prev_digest")
        payload["digest_version"] = values["digest_version"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


class Twins:
    """The twin tables' reads and writes for one dialect."""

    def __init__(self, sqlite: bool):
        self.sqlite = sqlite
        self._insert = sqlite_insert if sqlite else pg_insert
        # the hot path's statements, built once: building and cache-keying a select
        # costs more than the database takes to run it
        t = Twin.__table__.c
        ids = bindparam("ids", expanding=True)
        self._present = select(t.subject_id).where(t.subject_id.in_(ids))
        self._view = select(t.view).where(t.subject_id == bindparam("sid"))
        self._create_twins = self._insert(Twin.__table__).on_conflict_do_nothing(
            index_elements=["subject_id"]).returning(t.subject_id)
        self._add_forecasts = insert(Forecast.__table__)
        self._write_views = (
            update(Twin.__table__).where(t.subject_id == bindparam("sid"))
            .values(view=bindparam("view"), model_name=bindparam("mname"),
                    forecast_head=bindparam("head"), model_version=bindparam("mversion"),
                    event_count=bindparam("n_events"), last_event_time=bindparam("last_time"),
                    updated_at=bindparam("now")))

    # ------------------------------------------------------------------ twins
    def lock(self, s: Session, subject_ids: Sequence[int], *, create: bool,
             now: datetime | None = None) -> dict[int, TwinRow]:
        """The twins' rows, locked for this transaction in ascending id order (created
        when asked; ids that do not exist are absent from the answer otherwise)."""
        ids = sorted(set(subject_ids))
        if not ids:
            return {}
        conn = s.connection()
        if len(ids) > 1 and create:
            # find the missing ones without locking, so every lock below is taken in one
            # ascending pass
            have = set(conn.execute(self._present, {"ids": ids}).scalars())
            created = self._create(conn, [i for i in ids if i not in have], now)
            return {r.subject_id: r for r in self._twin_rows(s, ids, lock=True,
                                                             created=created)}
        found = {r.subject_id: r for r in self._twin_rows(s, ids, lock=True)}
        missing = [i for i in ids if i not in found]
        if create and missing:  # one twin: nothing held yet, so the order holds
            created = self._create(conn, missing, now)
            for r in self._twin_rows(s, missing, lock=True, created=created):
                found[r.subject_id] = r
        return found

    def _twin_rows(self, s: Session, ids: list[int], *, lock: bool,
                   created: set[int] = frozenset()) -> list[TwinRow]:
        """Twin rows by driver SQL, ascending (locked: ``FOR NO KEY UPDATE`` on
        PostgreSQL, which lets other writes' foreign-key checks pass) — plain tuples with
        times parsed here: SQLAlchemy's row and type processing cost more than the
        query."""
        sql = (f"SELECT {TWIN_COLUMNS} FROM twins WHERE subject_id IN "
               f"({', '.join('?' * len(ids))}) ORDER BY subject_id")
        if lock and not self.sqlite:
            sql += " FOR NO KEY UPDATE"
        result = s.connection().exec_driver_sql(self._sql(sql), tuple(ids))
        try:
            rows = result.cursor.fetchall()
        finally:
            result.close()
        when = _stored_time if self.sqlite else _same
        return [TwinRow(r[0], when(r[1]), when(r[2]), r[3], r[4], r[5], r[6], r[7],
                        created=r[0] in created) for r in rows]

    def _create(self, conn, ids: list[int], now: datetime | None) -> set[int]:
        if not ids:
            return set()
        now = now or utcnow()
        return set(conn.execute(self._create_twins, [
            {"subject_id": i, "created_at": now, "updated_at": now, "event_count": 0}
            for i in ids]).scalars())

    def peek(self, s: Session, subject_ids: Sequence[int]) -> dict[int, TwinRow]:
        """The twins' rows as they are now, without a lock (absent when missing)."""
        ids = sorted(set(subject_ids))
        return {r.subject_id: r for r in self._twin_rows(s, ids, lock=False)} if ids else {}

    def insert_new(self, s: Session, subject_id: int) -> None:
        """A brand-new twin row (its id comes from the id source: no conflict possible)."""
        now = utcnow()
        s.execute(insert(Twin).values(subject_id=subject_id, created_at=now, updated_at=now,
                                      event_count=0))

    def drop_new(self, s: Session, subject_id: int) -> None:
        """Remove a twin row this transaction created and nothing refers to."""
        s.execute(delete(Twin).where(Twin.subject_id == subject_id))

    def view(self, s: Session, subject_id: int) -> tuple[bool, str | None]:
        """(exists, kept view JSON) — one primary-key read."""
        row = s.connection().execute(self._view, {"sid": subject_id}).first()
        return (row is not None, row[0] if row is not None else None)

    def exists(self, s: Session, subject_id: int) -> bool:
        return s.execute(select(Twin.subject_id).where(Twin.subject_id == subject_id)
                         ).first() is not None

    def stale(self, s: Session, name: str, version: str, after: int, limit: int) -> list[int]:
        """Twins (ascending, above ``after``) whose forecast is not ``name`` ``version``."""
        q = (select(Twin.subject_id)
             .where(Twin.subject_id > after, self._not_version(name, version))
             .order_by(Twin.subject_id).limit(limit))
        return list(s.execute(q).scalars())

    def any_stale(self, s: Session, version: str) -> bool:
        """Whether some twin's forecast is not ``version`` — index-only look-ups, cheap
        enough to ask on every poll (a store serves one task, so the version decides)."""
        t = Twin.__table__.c
        for cond in (t.model_version.is_(None), t.model_version < version,
                     t.model_version > version):
            if s.execute(select(t.model_version).where(cond).limit(1)).first() is not None:
                return True
        return False

    def count_stale(self, s: Session, name: str, version: str) -> int:
        return int(s.execute(select(func.count()).select_from(Twin)
                             .where(self._not_version(name, version))).scalar_one())

    @staticmethod
    def _not_version(name: str, version: str):
        return or_(Twin.model_version.is_(None), Twin.model_version != version,
                   Twin.model_name.is_(None), Twin.model_name != name)

    # ------------------------------------------------------------------ events
    def append_events(self, s: Session, events: dict[int, Sequence[EventRow]], *,
                      source: str | dict[int, str] | None, now: datetime
                      ) -> dict[int, tuple[int, int]]:
        """Insert the events not seen before (by idempotency key), every twin at once;
        returns (added, duplicates) per twin.  Twin counters are the caller's to update."""
        rows, sent = event_rows(events, source=source, now=now)
        added = self.insert_events(s, rows, sent)
        return {sid: (added[sid], sent[sid] - added[sid]) for sid in sent}

    def insert_events(self, s: Session, rows: list[dict[str, Any]], twins: Iterable[int]
                      ) -> dict[int, int]:
        """Insert event rows unless their idempotency key exists; how many per twin."""
        added = dict.fromkeys(twins, 0)
        if rows:
            table = Event.__table__
            ins = self._insert(table).on_conflict_do_nothing(
                index_elements=["subject_id", "idempotency_key"]).returning(table.c.subject_id)
            for sid in s.connection().execute(ins, rows).scalars():
                added[sid] += 1
        return added

    def insert_new_events(self, s: Session, rows: list[dict[str, Any]]) -> int:
        """Insert event rows the caller found new under its twins' locks (duplicates are
        still skipped); how many went in.  Plain driver executemany: the bulk route's
        20,000 rows spend their time in the database, not in statement building."""
        if not rows:
            return 0
        sql = self._sql(f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(EVENT_COLUMNS))}) "
                        "ON CONFLICT (subject_id, idempotency_key) DO NOTHING")
        dt = self._param_time
        params = [(r["subject_id"], dt(r["time"]), r["code"], r["numeric_value"],
                   r["text_value"], dt(r["recorded_at"]), r["idempotency_key"], r["source"])
                  for r in rows]
        return s.connection().exec_driver_sql(sql, params).rowcount

    def existing_keys(self, s: Session, rows: list[dict[str, Any]]) -> set[tuple[int, str]]:
        """Which of the rows' (twin, idempotency key) pairs are stored already."""
        keys: dict[int, list[str]] = {}
        for r in rows:
            keys.setdefault(r["subject_id"], []).append(r["idempotency_key"])
        found: set[tuple[int, str]] = set()
        # "(twin = ? AND key IN (…)) OR …": one index search per twin (a plain
        # "twin IN (…) AND key IN (…)" probes every twin with every key); in chunks
        # below SQLite's limit on bound parameters
        terms: list[str] = []
        params: list[Any] = []
        for sid, ks in sorted(keys.items()):
            terms.append(f"(subject_id = ? AND idempotency_key IN ({', '.join('?' * len(ks))}))")
            params += [sid, *ks]
            if len(params) >= KEY_CHUNK:
                found.update(self._found(s, terms, params))
                terms, params = [], []
        if terms:
            found.update(self._found(s, terms, params))
        return found

    def _found(self, s: Session, terms: list[str], params: list[Any]) -> set[tuple[int, str]]:
        sql = self._sql("SELECT subject_id, idempotency_key FROM events WHERE "
                        + " OR ".join(terms))
        return {(r[0], r[1]) for r in s.connection().exec_driver_sql(sql, tuple(params))}

    def _sql(self, sql: str) -> str:
        """Driver SQL written with ``?`` placeholders, in this driver's style."""
        return sql if self.sqlite else sql.replace("?", "%s")

    def _param_time(self, t: datetime | None) -> datetime | str | None:
        """A naive-UTC time as a driver parameter: SQLite stores SQLAlchemy's text form."""
        if t is None or not self.sqlite:
            return t
        return t.isoformat(" ", "microseconds")

    def histories(self, s: Session, subject_ids: Iterable[int],
                  recorded_upto: datetime | None = None) -> History:
        """Every event of the twins (optionally those received by a time), read once."""
        return History.from_rows(self.history_rows(s, subject_ids, recorded_upto))

    def history_rows(self, s: Session, subject_ids: Iterable[int],
                     recorded_upto: datetime | None = None) -> list[tuple]:
        """(subject_id, time, code, value, text, id, recorded_at) of the twins' events."""
        ids = sorted(set(subject_ids))
        if not ids:
            return []
        # times as text: numpy parses a column of strings ~30x faster than it converts
        # datetime objects (naive UTC either way); driver SQL, as rows come in thousands
        text = "" if self.sqlite else "::text"
        sql = (f"SELECT subject_id, time{text}, code, numeric_value, text_value, id, "
               f"recorded_at{text} FROM events WHERE subject_id IN "
               f"({', '.join('?' * len(ids))})")
        params: list[Any] = list(ids)
        if recorded_upto is not None:
            sql += " AND recorded_at <= ?"
            params.append(self._param_time(recorded_upto))
        result = s.connection().exec_driver_sql(self._sql(sql), tuple(params))
        try:  # plain driver tuples: ~2x faster than Row objects for 10^5 rows
            return result.cursor.fetchall()
        finally:
            result.close()

    # ------------------------------------------------------------------ forecasts
    def add_forecasts(self, s: Session, rows: list[dict[str, Any]],
                      heads: dict[int, str | None]) -> dict[int, str]:
        """Append forecast rows (at most one per twin), each chained to its twin's
        previous row (``heads``: the twins' current chain heads, read under their
        locks).  Returns the new heads, which :meth:`write_views` stores."""
        now = utcnow()
        new = {}
        for r in rows:
            r.setdefault("created_at", now)
            r["digest_version"] = DIGEST_VERSION
            r["prev_digest"] = heads.get(r["subject_id"])
            r["row_digest"] = new[r["subject_id"]] = forecast_digest(r)
        if rows:
            s.connection().execute(self._add_forecasts, rows)
        return new

    def write_views(self, s: Session, updates: list[dict[str, Any]], heads: dict[int, str]
                    ) -> None:
        """Rewrite twins' counters, kept views, forecast versions and chain heads, in one
        statement."""
        if not updates:
            return
        for u in updates:
            u["head"] = heads[u["sid"]]
        s.connection().execute(self._write_views, updates)

    def sources_before(self, s: Session, subject_id: int, prefix: str, until: datetime,
                       limit: int = 20) -> list[str]:
        """The newest events' sources starting with ``prefix`` at or before ``until``."""
        return list(s.execute(select(Event.source).where(
            Event.subject_id == subject_id, Event.source.like(prefix + "%"),
            Event.time <= until).order_by(Event.time.desc()).limit(limit)).scalars())

    def forecasts(self, s: Session, subject_id: int, limit: int, offset: int
                  ) -> tuple[list[Forecast], int]:
        total = s.execute(select(func.count()).select_from(Forecast)
                          .where(Forecast.subject_id == subject_id)).scalar_one()
        rows = s.execute(select(Forecast).where(Forecast.subject_id == subject_id)
                         .order_by(Forecast.seq.desc()).limit(limit).offset(offset)).scalars()
        return list(rows), int(total)

    def forecast_by_id(self, s: Session, forecast_id: str) -> Forecast | None:
        return s.execute(select(Forecast).where(Forecast.forecast_id == forecast_id)
                         ).scalar_one_or_none()


def event_rows(events: dict[int, Sequence[EventRow]], *,
               source: str | dict[int, str] | None, now: datetime
               ) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Store rows of the events (each key once per twin) and how many each twin sent;
    ``source`` for events that name none (one for all, or per twin)."""
    rows, seen = [], set()
    sent: dict[int, int] = {}
    for sid, evs in events.items():
        sent[sid] = len(evs)
        default = source.get(sid) if isinstance(source, dict) else source
        for r in evs:
            key = idempotency_key(sid, r.time, r.code, r.numeric_value, r.text_value,
                                  r.client_id)
            if (sid, key) in seen:
                continue
            seen.add((sid, key))
            rows.append({"subject_id": sid, "time": r.time, "code": r.code,
                         "numeric_value": r.numeric_value, "text_value": r.text_value,
                         "recorded_at": now, "idempotency_key": key,
                         "source": r.source or default})
    return rows, sent


@dataclass
class History:
    """Events of several twins as canonical arrays (the model's input) plus what a twin's
    view needs: its latest value per code and the newest ``recorded_at`` (watermark)."""

    arrays: EventArrays
    latest: dict[int, list[dict[str, Any]]]
    watermark: dict[int, datetime]
    last_time: dict[int, datetime]
    count: dict[int, int]

    @classmethod
    def from_rows(cls, rows: Sequence[tuple]) -> History:
        """From (subject_id, time, code, value, text, id, recorded_at) rows in any order
        (times naive UTC, as datetimes or ISO strings)."""
        n = len(rows)
        if n == 0:
            return cls(event_arrays(()), {}, {}, {}, {})
        # column by column (zip(*rows) of 10^5 tuples costs 5x more)
        sid_l, t_l, code_l, value_l, text_l, id_l, rec_l = (
            list(map(itemgetter(k), rows)) for k in range(7))
        sid = np.array(sid_l, dtype=np.int64)
        t = np.array(t_l, dtype="datetime64[us]").view(np.int64)  # None → NaT (int64 min)
        code, cats = _codes(code_l)
        value = np.array(value_l, dtype=np.float64).astype(np.float32)  # None → NaN
        eid = np.array(id_l, dtype=np.int64)
        rec = np.array(rec_l, dtype="datetime64[us]").view(np.int64)
        arrays = _canonical(sid, t, code, cats, value)
        # latest per (subject, code): by time (static facts first), then by arrival
        order = np.lexsort((eid, t, code, sid))
        s_o, c_o = sid[order], code[order]
        last = np.r_[(s_o[1:] != s_o[:-1]) | (c_o[1:] != c_o[:-1]), True]
        latest: dict[int, list[dict[str, Any]]] = {}
        pick = order[last]  # ascending subject, then code
        for i, s_i, c_i, t_i in zip(pick.tolist(), sid[pick].tolist(),
                                    cats[code[pick]].tolist(), datetimes_of(t[pick]),
                                    strict=True):
            text = text_l[i]
            latest.setdefault(s_i, []).append({
                "code": c_i, "time": t_i, "numeric_value": value_l[i],
                "text_value": text if isinstance(text, str) else None})
        subjects = np.unique(sid)
        grouped = np.argsort(sid, kind="stable")
        starts = np.searchsorted(sid[grouped], subjects)
        counts = np.diff(np.r_[starts, n])
        wm = np.maximum.reduceat(rec[grouped], starts)
        tl = np.maximum.reduceat(t[grouped], starts)
        keys = subjects.tolist()
        return cls(arrays, latest,
                   dict(zip(keys, datetimes_of(wm), strict=True)),
                   {k: x for k, x in zip(keys, datetimes_of(tl), strict=True)
                    if x is not None},
                   dict(zip(keys, counts.tolist(), strict=True)))


def datetime_of(us: int) -> datetime:
    """Microseconds since the epoch as a naive-UTC datetime."""
    return np.datetime64(int(us), "us").astype(datetime)


def datetimes_of(us: np.ndarray) -> list[datetime | None]:
    """Microseconds since the epoch as naive-UTC datetimes (NaT: None), vectorised."""
    return us.astype(np.int64).astype("datetime64[us]").astype(object).tolist()


def event_arrays(rows: Sequence[tuple]) -> EventArrays:
    """Events as the canonical arrays the feature code reads — the same values and order
    as ``EventArrays.from_events(events_from_frame(...))`` gives the model package
    (values rounded to float32, MEDS's type; sorted by subject, time with static facts
    first, code, value), without a DataFrame.  Rows: (subject_id, time, code, value, …)."""
    if len(rows) == 0:
        return EventArrays(np.empty(0, np.int64), np.empty(0, np.int64),
                           np.empty(0, np.int32), (), np.empty(0, np.float64))
    sid_l, t_l, code_l, value_l = (list(map(itemgetter(k), rows)) for k in range(4))
    code, cats = _codes(code_l)
    return _canonical(np.array(sid_l, dtype=np.int64),
                      np.array(t_l, dtype="datetime64[us]").view(np.int64), code, cats,
                      np.array(value_l, dtype=np.float64).astype(np.float32))


def _codes(codes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(index of each code in the sorted distinct codes, those codes): np.unique's
    answer, by hashing rather than sorting strings."""
    index, cats = pd.factorize(np.array(codes, dtype=object), sort=True)
    return index, np.asarray(cats, dtype=str)


def _canonical(sid: np.ndarray, t: np.ndarray, code: np.ndarray, cats: np.ndarray,
               value: np.ndarray) -> EventArrays:
    order = np.lexsort((value, code, t, sid))
    return EventArrays(subject_id=sid[order], time_us=t[order],
                       code=code[order].astype(np.int32),
                       categories=tuple(str(c) for c in cats),
                       value=value[order].astype(np.float64))
