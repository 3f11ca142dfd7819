"""Twins, their events, forecasts and views: plain functions of a session, batch-first.

Events are appended, never changed, with one exception: an event from a resource (FHIR's
logical id) is *superseded* — kept, but no longer live — when a new version of the
resource drops it or the resource is retracted (:meth:`Twins.append_events`).  Reads
see live events, or those live at a past time.

Patient data stays in the database: nothing here logs values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring_ascii as _json_str
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sqlalchemy import (
    and_,
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

import serving.store.arrays as arrays
from features.events import NAT_US, EventArrays, shortest_f32
from serving.store.models import Event, Forecast, Twin

KEY_CHUNK = 20_000  # bound parameters per query
SCAN_KEYS_RATIO = 6  # existing_keys: read a twin's keys when sent x this >= its events
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value", "recorded_at",
                 "idempotency_key", "source")
# a view update's keys (writer's names) by the twins column each rewrites
VIEW_KEYS = {"subject_id": "sid", "view": "view", "model_name": "mname",
             "model_version": "mversion", "event_count": "n_events",
             "last_event_time": "last_time", "updated_at": "now", "forecast_head": "head"}
FLOAT32_MAX = float(np.finfo(np.float32).max)  # MEDS stores values as float32
LOGICAL_ID_MAX = 200  # events.logical_id
KEY_LOGICAL_MAX = 90  # a logical id's share of a 128-character idempotency key
EPOCH = datetime(1970, 1, 1)  # noqa: DTZ001 - naive UTC, as stored


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


def content_hash(subject_id: int, time: datetime | None, code: str, value: float | None,
                 text: str | None) -> str:
    """The first 16 hex digits of an event's content hash (its key when it has no id)."""
    return idempotency_key(subject_id, time, code, value, text, None)[2:18]


def family(logical_id: str) -> str:
    """The resource a logical id belongs to: the part before the first "#".

    >>> family("Observation/abc#http://loinc.org|8480-6"), family("Observation/abc")
    ('Observation/abc', 'Observation/abc')
    """
    return logical_id.split("#", 1)[0]


def revision_key(logical_id: str, content: str) -> str:
    """The idempotency key of one version of a resource's event: ``id:<logical id>@<content
    hash>`` (a long logical id cut, ending in a digest of the whole: distinct stay distinct).

    >>> revision_key("Observation/abc", "0123456789abcdef")
    'id:Observation/abc@0123456789abcdef'
    """
    if len(logical_id) > KEY_LOGICAL_MAX:
        logical_id = (logical_id[:KEY_LOGICAL_MAX - 17] + "~"
                      + hashlib.sha256(logical_id.encode()).hexdigest()[:16])
    return f"id:{logical_id}@{content}"


class EventRow(NamedTuple):
    """One event as the write path takes it: times naive UTC, values already checked
    (immutable; a tuple because the bulk route builds 20,000 of them per request, at a
    quarter of a frozen dataclass's cost).

    ``logical_id``: the resource the event belongs to (events of one resource share its
    family, the part before the first "#"); such events are versions of the resource
    rather than keyed by ``client_id``.  ``retract``: not an event but "the resource
    ``logical_id`` was entered in error": every live event of its family is taken back.
    """

    time: datetime | None
    code: str
    numeric_value: float | None
    text_value: str | None
    client_id: str | None = None
    source: str | None = None
    logical_id: str | None = None
    retract: bool = False


class Appended(NamedTuple):
    """What a write did to one twin's events."""

    added: int
    duplicates: int  # sent but changing nothing (re-sends)
    superseded: int = 0  # live rows taken back by a new version or a retraction


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
TWIN_COLUMNS_NO_VIEW = TWIN_COLUMNS.replace(" view,", " NULL,")


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


# 1: the row alone; 2: the row and its twin's previous row's digest; 3: and trajectories
DIGEST_VERSION = 3


def forecast_digest(values: dict[str, Any]) -> str:
    """SHA-256 over a forecast row's content (tamper evidence).  From version 2 it also
    covers ``prev_digest``, the digest of the twin's previous forecast row, so each
    twin's forecasts form a chain: a row altered, re-digested or deleted breaks the
    link to the next one.  From version 3 it covers the row's trajectories too."""
    def norm(v):
        return v.isoformat() if isinstance(v, datetime) else v
    payload = {k: norm(values.get(k)) for k in FORECAST_DIGEST_FIELDS}
    version = values.get("digest_version") or 1
    if version >= 2:
        payload["prev_digest"] = values.get("prev_digest")
        payload["digest_version"] = values["digest_version"]
    if version >= 3 or values.get("trajectories") is not None:
        # (an older row never stored any: trajectories added to one break its digest)
        payload["trajectories"] = values.get("trajectories")
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
        e = Event.__table__.c
        self._superseded = (select(e.subject_id, func.max(e.superseded_at))
                            .where(e.subject_id.in_(ids), e.logical_id.is_not(None),
                                   e.superseded_at.is_not(None)).group_by(e.subject_id))
        self._superseded_upto = self._superseded.where(e.superseded_at <= bindparam("upto"))
        self._present = select(t.subject_id).where(t.subject_id.in_(ids))
        self._create_twins = self._insert(Twin.__table__).on_conflict_do_nothing(
            index_elements=["subject_id"]).returning(t.subject_id)
        self._add_forecasts = insert(Forecast.__table__)
        self._write_views = (
            update(Twin.__table__).where(t.subject_id == bindparam(VIEW_KEYS["subject_id"]))
            .values(**{c: bindparam(k) for c, k in VIEW_KEYS.items() if c != "subject_id"}))

    # ------------------------------------------------------------------ twins
    def lock(self, s: Session, subject_ids: Sequence[int], *, create: bool,
             now: datetime | None = None, views: bool = False) -> dict[int, TwinRow]:
        """The twins' rows, locked for this transaction in ascending id order (created
        when asked; ids that do not exist are absent from the answer otherwise); their
        kept views only with ``views`` (else ``view`` is None: a few kB a twin that most
        writers never read)."""
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
                                                             created=created, views=views)}
        found = {r.subject_id: r for r in self._twin_rows(s, ids, lock=True, views=views)}
        missing = [i for i in ids if i not in found]
        if create and missing:  # one twin: nothing held yet, so the order holds
            created = self._create(conn, missing, now)
            for r in self._twin_rows(s, missing, lock=True, created=created, views=views):
                found[r.subject_id] = r
        return found

    def _twin_rows(self, s: Session, ids: list[int], *, lock: bool,
                   created: set[int] = frozenset(), views: bool = True) -> list[TwinRow]:
        """Twin rows by driver SQL, ascending (locked: ``FOR NO KEY UPDATE`` on
        PostgreSQL, which lets other writes' foreign-key checks pass) — plain tuples with
        times parsed here: SQLAlchemy's row and type processing cost more than the
        query."""
        sql = (f"SELECT {TWIN_COLUMNS if views else TWIN_COLUMNS_NO_VIEW} FROM twins "
               "WHERE subject_id IN "
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

    def peek(self, s: Session, subject_ids: Sequence[int], *, views: bool = False
             ) -> dict[int, TwinRow]:
        """The twins' rows as they are now, without a lock (absent when missing;
        ``views``: as :meth:`lock`)."""
        ids = sorted(set(subject_ids))
        return {r.subject_id: r for r in self._twin_rows(s, ids, lock=False, views=views)
                } if ids else {}

    def insert_new(self, s: Session, subject_id: int) -> None:
        """A brand-new twin row (its id comes from the id source: no conflict possible)."""
        now = utcnow()
        s.execute(insert(Twin).values(subject_id=subject_id, created_at=now, updated_at=now,
                                      event_count=0))

    def drop_new(self, s: Session, subject_id: int) -> None:
        """Remove a twin row this transaction created and nothing refers to."""
        s.execute(delete(Twin).where(Twin.subject_id == subject_id))

    def views(self, s: Session, subject_ids: Sequence[int]) -> dict[int, str | None]:
        """The kept views of the twins that exist (None: no forecast yet), one read."""
        ids = sorted(set(subject_ids))
        if not ids:
            return {}
        sql = ("SELECT subject_id, view FROM twins WHERE subject_id IN "
               f"({', '.join('?' * len(ids))})")
        result = s.connection().exec_driver_sql(self._sql(sql), tuple(ids))
        try:
            return dict(result.cursor.fetchall())
        finally:
            result.close()

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

    def any_twin(self, s: Session) -> bool:
        return s.execute(select(Twin.subject_id).limit(1)).first() is not None

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
                      ) -> dict[int, Appended]:
        """Insert the events not seen before, every twin at once; returns (added,
        duplicates, superseded) per twin.  Events without a logical id are kept by
        idempotency key; those with one are versions of their resource
        (:meth:`_revise`).  Twin counters are the caller's to update."""
        plain = {sid: [r for r in evs if r.logical_id is None] for sid, evs in events.items()}
        rows, sent = event_rows(plain, source=source, now=now)
        added = self.insert_events(s, rows, sent)
        out = {sid: Appended(added[sid], sent[sid] - added[sid]) for sid in sent}
        revised = {sid: [r for r in evs if r.logical_id is not None]
                   for sid, evs in events.items()}
        revised = {sid: evs for sid, evs in revised.items() if evs}
        if revised:
            for sid, got in self._revise(s, revised, source=source, now=now).items():
                out[sid] = Appended(out[sid].added + got.added,
                                    out[sid].duplicates + got.duplicates, got.superseded)
        return out

    def _revise(self, s: Session, events: dict[int, list[EventRow]], *,
                source: str | dict[int, str] | None, now: datetime) -> dict[int, Appended]:
        """Events of resources, per (twin, family): a version seen before changes nothing.

        With K the incoming (logical id, content hash) pairs, E every stored row's pair
        (live or superseded, the hash computed from the row's columns, so rows keyed
        before logical ids compare by content too) and L the live rows' pairs:

        - every pair of K in E: a re-send (duplicates).  A version seen before is a
          re-send, never a correction back to it; so is a version that only drops
          components of one seen before;
        - else a new version: live rows whose pair is not in K are superseded (``now``),
          incoming rows whose pair is not in L are inserted;
        - a retraction: every live row of the family is superseded, nothing inserted
          (re-sending an old version afterwards is a re-send).
        """
        stored = self._family_rows(s, {sid: {family(r.logical_id) for r in evs}
                                       for sid, evs in events.items()})
        suffix = f"~{(now - EPOCH) // timedelta(microseconds=1)}"
        rows: list[dict[str, Any]] = []
        gone: list[int] = []
        counts: dict[int, list[int]] = {}  # [incoming events, retractions, superseded]
        for sid, evs in events.items():
            default = source.get(sid) if isinstance(source, dict) else source
            n = counts[sid] = [0, 0, 0]
            by_family: dict[str, list[EventRow]] = {}
            for r in evs:
                by_family.setdefault(family(r.logical_id), []).append(r)
            for fam, revs in by_family.items():
                have = stored.get((sid, fam), [])
                live = [h for h in have if h["superseded_at"] is None]
                if any(r.retract for r in revs):
                    gone += [h["id"] for h in live]
                    n[1] += len(revs) - (1 if live else 0)
                    n[2] += len(live)
                    continue
                n[0] += len(revs)
                incoming: dict[tuple[str, str], EventRow] = {}
                for r in revs:
                    incoming.setdefault((r.logical_id, content_hash(
                        sid, r.time, r.code, r.numeric_value, r.text_value)), r)
                if incoming.keys() <= {h["pair"] for h in have}:
                    continue  # a re-send
                stale = [h["id"] for h in live if h["pair"] not in incoming]
                gone += stale
                n[2] += len(stale)
                now_live = {h["pair"] for h in live}
                keys = {h["key"] for h in have}
                for (lid, content), r in incoming.items():
                    if (lid, content) in now_live:
                        continue
                    key = revision_key(lid, content)
                    rows.append({"subject_id": sid, "time": r.time, "code": r.code,
                                 "numeric_value": r.numeric_value, "text_value": r.text_value,
                                 "recorded_at": now,
                                 "idempotency_key": key + suffix if key in keys else key,
                                 "source": r.source or default, "logical_id": lid})
        self._supersede(s, gone, now)
        added = self.insert_events(s, rows, events)
        # a retraction is not an event: one that finds nothing live counts as nothing
        return {sid: Appended(added[sid], n[0] - added[sid], n[2])
                for sid, n in counts.items()}

    def _family_rows(self, s: Session, families: dict[int, set[str]]
                     ) -> dict[tuple[int, str], list[dict[str, Any]]]:
        """Every stored row (live or superseded) of the twins' resource families, with its
        (logical id, content hash) pair."""
        e = Event.__table__.c
        step = KEY_CHUNK // 3  # bound parameters: at most three a family (with its twin)
        batches: list[list] = [[]]  # per query, one term per twin: one index range each
        room = step
        for sid, fams in sorted(families.items()):
            fams = sorted(fams)
            while fams:
                part, fams = fams[:room], fams[room:]
                # "logical_id IS NOT NULL" spelt out: the index on it is partial
                batches[-1].append(and_(e.subject_id == sid, e.logical_id.is_not(None), or_(*(
                    or_(e.logical_id == f, e.logical_id.like(_like_escape(f) + "#%",
                                                             escape="!")) for f in part))))
                room -= len(part)
                if room == 0:
                    batches.append([])
                    room = step
        out: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for terms in filter(None, batches):
            q = select(e.id, e.subject_id, e.logical_id, e.idempotency_key, e.time, e.code,
                       e.numeric_value, e.text_value, e.superseded_at).where(or_(*terms))
            for r in s.connection().execute(q):
                fam = family(r.logical_id)
                if fam not in families[r.subject_id]:
                    continue  # LIKE ignores ASCII case on SQLite
                out.setdefault((r.subject_id, fam), []).append({
                    "id": r.id, "key": r.idempotency_key, "superseded_at": r.superseded_at,
                    "pair": (r.logical_id, content_hash(r.subject_id, r.time, r.code,
                                                        r.numeric_value, r.text_value))})
        return out

    def _supersede(self, s: Session, ids: list[int], now: datetime) -> None:
        e = Event.__table__.c
        for lo in range(0, len(ids), KEY_CHUNK):
            s.connection().execute(update(Event.__table__).where(
                e.id.in_(ids[lo:lo + KEY_CHUNK]), e.superseded_at.is_(None)
            ).values(superseded_at=now))

    def last_superseded(self, s: Session, subject_ids: Iterable[int],
                        upto: datetime | None = None) -> dict[int, datetime]:
        """Each twin's latest supersession (by ``upto``): a change its history reflects
        though no live row was recorded then."""
        ids = sorted(set(subject_ids))
        if not ids:
            return {}
        if upto is None:
            return dict(s.connection().execute(self._superseded, {"ids": ids}).all())
        return dict(s.connection().execute(self._superseded_upto,
                                           {"ids": ids, "upto": upto}).all())

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
        if arrays.worth(rows, sqlite=self.sqlite):  # binary arrays: 20,000 rows 720 -> 480 ms
            table = Event.__table__
            return s.connection().exec_driver_sql(
                arrays.insert_sql(table, EVENT_COLUMNS,
                                  "ON CONFLICT (subject_id, idempotency_key) DO NOTHING"),
                arrays.arrays(table, rows, EVENT_COLUMNS)).rowcount
        sql = self._sql(f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(EVENT_COLUMNS))}) "
                        "ON CONFLICT (subject_id, idempotency_key) DO NOTHING")
        dt = self._param_time
        stamps = {rec: dt(rec) for rec in {r["recorded_at"] for r in rows}}  # one a write
        params = [(r["subject_id"], dt(r["time"]), r["code"], r["numeric_value"],
                   r["text_value"], stamps[r["recorded_at"]], r["idempotency_key"],
                   r["source"]) for r in rows]
        return s.connection().exec_driver_sql(sql, params).rowcount

    def existing_keys(self, s: Session, rows: list[dict[str, Any]],
                      stored: dict[int, int] | None = None) -> set[tuple[int, str]]:
        """Which of the rows' (twin, idempotency key) pairs are stored already.

        ``stored``: how many events each twin holds, when known — a twin sent more than a
        sixth of that has all its keys read in one range of the index instead of each
        looked up (a key read costs about a sixth of a look-up: 0.8 vs 4.9 µs on SQLite)."""
        keys: dict[int, list[str]] = {}
        for r in rows:
            keys.setdefault(r["subject_id"], []).append(r["idempotency_key"])
        found: set[tuple[int, str]] = set()
        scan = sorted(sid for sid, ks in keys.items()
                      if stored is not None and len(ks) * SCAN_KEYS_RATIO >= stored.get(sid, 0))
        if scan:
            sent = {(sid, k) for sid in scan for k in keys.pop(sid)}
            for lo in range(0, len(scan), KEY_CHUNK):
                part = scan[lo:lo + KEY_CHUNK]
                sql = self._sql("SELECT subject_id, idempotency_key FROM events WHERE "
                                f"subject_id IN ({', '.join('?' * len(part))})")
                result = s.connection().exec_driver_sql(sql, tuple(part))
                try:
                    found.update(p for p in result.cursor.fetchall() if p in sent)
                finally:
                    result.close()
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
        """The twins' live events (or those live at ``recorded_upto``), read once; the
        watermark is the latest change the history reflects (an event recorded, or one
        superseded), so a replay at it sees the same history."""
        ids = sorted(set(subject_ids))
        return History.from_rows(self.history_rows(s, ids, recorded_upto),
                                 self.last_superseded(s, ids, recorded_upto))

    def history_rows(self, s: Session, subject_ids: Iterable[int],
                     recorded_upto: datetime | None = None) -> list[tuple]:
        """(subject_id, time, code, value, text, id, recorded_at) of the twins' live events
        (with ``recorded_upto``: those recorded by then and not superseded by then)."""
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
        if recorded_upto is None:
            sql += " AND superseded_at IS NULL"
        else:
            sql += " AND recorded_at <= ? AND (superseded_at IS NULL OR superseded_at > ?)"
            params += [self._param_time(recorded_upto)] * 2
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
        if not rows:
            return new
        if not arrays.worth(rows, sqlite=self.sqlite):
            s.connection().execute(self._add_forecasts, rows)
        else:  # one statement, one binary array per column (1,000 rows: 170 -> 159 ms)
            table, columns = Forecast.__table__, tuple(rows[0])  # every row: these keys
            s.connection().exec_driver_sql(arrays.insert_sql(table, columns),
                                           arrays.arrays(table, rows, columns))
        return new

    def write_views(self, s: Session, updates: list[dict[str, Any]], heads: dict[int, str]
                    ) -> None:
        """Rewrite twins' counters, kept views, forecast versions and chain heads, in one
        statement."""
        if not updates:
            return
        for u in updates:
            u["head"] = heads[u["sid"]]
        if not arrays.worth(updates, sqlite=self.sqlite):
            s.connection().execute(self._write_views, updates)
            return
        arrays.distinct(updates, "sid")
        table = Twin.__table__
        columns = tuple(c for c in VIEW_KEYS if c != "subject_id")
        s.connection().exec_driver_sql(
            arrays.update_sql(table, "subject_id", columns),
            arrays.arrays(table, updates, ("subject_id", *columns), VIEW_KEYS))

    def sources_before(self, s: Session, subject_id: int, prefix: str, until: datetime,
                       limit: int = 20) -> list[str]:
        """The newest live events' sources starting with ``prefix`` at or before ``until``."""
        return list(s.execute(select(Event.source).where(
            Event.subject_id == subject_id, Event.source.like(prefix + "%"),
            Event.time <= until, Event.superseded_at.is_(None))
            .order_by(Event.time.desc()).limit(limit)).scalars())

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


def _like_escape(text: str) -> str:
    """``text`` as a literal in a LIKE pattern with escape character "!"."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def event_rows(events: dict[int, Sequence[EventRow]], *,
               source: str | dict[int, str] | None, now: datetime
               ) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Store rows of the events (each key once per twin) and how many each twin sent;
    ``source`` for events that name none (one for all, or per twin).  Events of resources
    (a logical id) are not plain appends: :meth:`Twins.append_events` takes them."""
    rows, seen = [], set()
    sent: dict[int, int] = {}
    for sid, evs in events.items():
        sent[sid] = len(evs)
        default = source.get(sid) if isinstance(source, dict) else source
        for r in evs:
            if r.logical_id is not None or r.retract:
                raise ValueError("an event of a resource (logical id) is a revision, not an "
                                 "append: write it through Twins.append_events")
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


APPEND_IN_PLACE_MAX = 8  # new events a kept history takes in place (each costs a pass)


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
    def from_rows(cls, rows: Sequence[tuple], superseded: dict[int, datetime] | None = None
                  ) -> History:
        """From (subject_id, time, code, value, text, id, recorded_at) rows in any order
        (times naive UTC, as datetimes or ISO strings); ``superseded``: each twin's latest
        supersession, a change the watermark covers too."""
        history = cls._from_rows(rows)
        for sid, t in (superseded or {}).items():
            wm = history.watermark.get(sid)
            history.watermark[sid] = t if wm is None else max(wm, t)
        return history

    @classmethod
    def from_columns(cls, cols: EventColumns, superseded: dict[int, datetime] | None = None
                     ) -> History:
        """As :meth:`from_rows`, from events already in columns."""
        history = cls._from_columns(cols)
        for sid, t in (superseded or {}).items():
            wm = history.watermark.get(sid)
            history.watermark[sid] = t if wm is None else max(wm, t)
        return history

    def appended(self, new: EventColumns) -> History | None:
        """This one twin's history with ``new`` of its events added, each arrived after
        every event here — what :meth:`from_columns` builds from all of them, at a small
        part of its cost (a one-event write's history was a tenth of its time) — or None
        when that cannot be had in place (no events yet, another twin's events, a code
        the twin has not had: its categories change), and the history is built anew."""
        a = self.arrays
        if not 0 < len(new) <= APPEND_IN_PLACE_MAX or a.subject_id.size == 0 \
                or len(self.count) != 1:
            return None
        sid = int(a.subject_id[0])
        if bool((new.sid != sid).any()):
            return None
        index = {c: i for i, c in enumerate(a.categories)}
        codes = [index.get(c) for c in new.code.tolist()]
        if None in codes:
            return None
        t_arr, c_arr, v_arr, latest = a.time_us, a.code, a.value, list(self.latest[sid])
        at = {e["code"]: i for i, e in enumerate(latest)}
        values32 = new.value.astype(np.float32)
        shown = shortest_f32(values32)
        texts = new.text
        for k, (c, t, v) in enumerate(zip(codes, new.t.tolist(), values32.astype(np.float64)
                                          .tolist(), strict=True)):
            # canonical order is (time, code, value), values' NaN last, ties stable: the
            # new event goes after every event whose key is not above its own
            same = (c_arr == c) & ((v_arr <= v) if v == v else True)
            pos = int(((t_arr < t) | ((t_arr == t) & ((c_arr < c) | same))).sum())
            t_arr, c_arr = np.insert(t_arr, pos, t), np.insert(c_arr, pos, c)
            v_arr = np.insert(v_arr, pos, v)
            # the latest of its code: the later time wins, and of equal times the later
            # arrival (static facts, NaT, are the earliest)
            when = None if t == NAT_US else datetime_of(t)
            old = latest[at[new.code[k]]]
            if old["time"] is None or (when is not None and when >= old["time"]):
                text = texts[k] if texts is not None else None
                latest[at[new.code[k]]] = {
                    "code": new.code[k], "time": when, "numeric_value": shown[k],
                    "text_value": text if isinstance(text, str) else None}
        arrays = EventArrays(np.full(t_arr.size, sid, dtype=np.int64), t_arr, c_arr,
                             a.categories, v_arr)
        watermark = max(self.watermark[sid], datetime_of(int(new.rec.max())))
        last = dict(self.last_time)
        dated = new.t[new.t != NAT_US]
        if dated.size:
            newest = datetime_of(int(dated.max()))
            last[sid] = max(last[sid], newest) if sid in last else newest
        return History(arrays, {sid: latest}, {sid: watermark}, last,
                       {sid: self.count[sid] + len(new)})

    def nbytes(self) -> int:
        """Memory held: the arrays and the latest values (a few hundred bytes each)."""
        a = self.arrays
        return (a.subject_id.nbytes + a.time_us.nbytes + a.code.nbytes + a.value.nbytes
                + 300 * sum(len(v) for v in self.latest.values()))

    @classmethod
    def _from_rows(cls, rows: Sequence[tuple]) -> History:
        return cls._from_columns(EventColumns.from_rows(rows))

    @classmethod
    def _from_columns(cls, cols: EventColumns) -> History:
        n = len(cols)
        if n == 0:
            return cls(event_arrays(()), {}, {}, {}, {})
        sid, t, value, eid, rec = cols.sid, cols.t, cols.value, cols.eid, cols.rec
        code, cats = _codes(cols.code)
        arrays = _canonical(sid, t, code, cats, value.astype(np.float32))
        # latest per (subject, code): by time (static facts first), then by arrival
        order = np.lexsort((eid, t, code, sid))
        s_o, c_o = sid[order], code[order]
        last = np.r_[(s_o[1:] != s_o[:-1]) | (c_o[1:] != c_o[:-1]), True]
        latest: dict[int, list[dict[str, Any]]] = {}
        pick = order[last]  # ascending subject, then code
        texts = cols.text
        # values as the model reads them (float32, MEDS's type), shown as their shortest
        # decimal: an imported 88.1 is 88.1, not 88.0999984741211
        shown = shortest_f32(value[pick])
        for i, s_i, c_i, t_i, v_i in zip(pick.tolist(), sid[pick].tolist(),
                                         cats[code[pick]].tolist(), datetimes_of(t[pick]),
                                         shown, strict=True):
            text = texts[i] if texts is not None else None
            latest.setdefault(s_i, []).append({
                "code": c_i, "time": t_i, "numeric_value": v_i,
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


@dataclass(frozen=True)
class EventColumns:
    """Stored events as columns: what a history is built from, and what a worker keeps of
    a twin between its writes (a few NumPy arrays, not one object per value, so a large
    cache adds next to nothing to the garbage collector's work)."""

    sid: np.ndarray  # int64
    t: np.ndarray  # int64 microseconds since the epoch, naive UTC; NaT (int64 min): static
    code: np.ndarray  # object (str): no fixed width, and factorised without a copy
    value: np.ndarray  # float64, NaN: no value
    text: np.ndarray | None  # object (str or None) — None when no event has a text
    eid: np.ndarray  # int64: arrival order
    rec: np.ndarray  # int64 microseconds: recorded_at

    def __len__(self) -> int:
        return len(self.sid)

    def nbytes(self) -> int:
        """Memory held: the arrays, each code (a Python string: about 8 pointers' worth)
        and each text at its length."""
        texts = 0 if self.text is None else sum(
            56 + len(x) for x in self.text.tolist() if isinstance(x, str))
        return (self.sid.nbytes + self.t.nbytes + self.code.nbytes * 9 + self.value.nbytes
                + self.eid.nbytes + self.rec.nbytes + texts
                + (0 if self.text is None else self.text.nbytes))

    @classmethod
    def from_rows(cls, rows: Sequence[tuple]) -> EventColumns:
        """From (subject_id, time, code, value, text, id, recorded_at) rows (times naive
        UTC, as datetimes or ISO strings) — column by column (zip(*rows) of 10^5 tuples
        costs 5x more)."""
        sid_l, t_l, code_l, value_l, text_l, id_l, rec_l = (
            list(map(itemgetter(k), rows)) for k in range(7))
        texts = None
        if any(x is not None for x in text_l):
            texts = np.empty(len(text_l), dtype=object)
            texts[:] = text_l
        return cls(np.array(sid_l, dtype=np.int64),
                   np.array(t_l, dtype="datetime64[us]").view(np.int64),
                   _objects(code_l),
                   np.array(value_l, dtype=np.float64).reshape(-1),  # None → NaN
                   texts, np.array(id_l, dtype=np.int64),
                   np.array(rec_l, dtype="datetime64[us]").view(np.int64))

    @classmethod
    def concat(cls, parts: Sequence[EventColumns]) -> EventColumns:
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.from_rows([])
        texts = None
        if any(p.text is not None for p in parts):
            texts = np.concatenate([p.text if p.text is not None
                                    else np.full(len(p), None, dtype=object) for p in parts])
        return cls(*(np.concatenate([getattr(p, k) for p in parts])
                     for k in ("sid", "t", "code", "value")), texts,
                   np.concatenate([p.eid for p in parts]),
                   np.concatenate([p.rec for p in parts]))

    def canonical(self) -> tuple[EventArrays, np.ndarray]:
        """The canonical arrays the feature and label code read, and each event's
        arrival time (``recorded_at``, µs) in the same order."""
        code, cats = _codes(self.code)
        value = self.value.astype(np.float32)
        order = np.lexsort((value, code, self.t, self.sid))
        return _canonical(self.sid, self.t, code, cats, value), self.rec[order]

    def by_subject(self) -> dict[int, EventColumns]:
        """Each twin's rows (in their order here)."""
        if len(self) == 0:
            return {}
        order = np.argsort(self.sid, kind="stable")
        subjects, starts = np.unique(self.sid[order], return_index=True)
        out = {}
        for sid, part in zip(subjects.tolist(), np.split(order, starts[1:]), strict=True):
            out[sid] = EventColumns(self.sid[part], self.t[part], self.code[part],
                                    self.value[part],
                                    None if self.text is None else self.text[part],
                                    self.eid[part], self.rec[part])
        return out


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


def _objects(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _codes(codes) -> tuple[np.ndarray, np.ndarray]:
    """(index of each code in the sorted distinct codes, those codes): np.unique's
    answer, by hashing rather than sorting strings."""
    codes = codes if isinstance(codes, np.ndarray) and codes.dtype == object else \
        np.array(codes, dtype=object)
    index, cats = pd.factorize(codes, sort=True)
    return index, np.asarray(cats, dtype=str)


def _canonical(sid: np.ndarray, t: np.ndarray, code: np.ndarray, cats: np.ndarray,
               value: np.ndarray) -> EventArrays:
    order = np.lexsort((value, code, t, sid))
    return EventArrays(subject_id=sid[order], time_us=t[order],
                       code=code[order].astype(np.int32),
                       categories=tuple(str(c) for c in cats),
                       value=value[order].astype(np.float64))
