"""The one write path: every way a twin changes goes through :class:`TwinWriter`.

The events route, FHIR bundles, CDS hook calls, the bulk route and the refresh hand it a
batch; in one transaction it resolves external identifiers (sorted, before any twin is
locked), locks the batch's twins in ascending id order, checks that this worker serves
the served version (reloading first when behind), appends events idempotently, reads
each history once, featurises and forecasts the whole batch in one call, appends the
forecast rows, rewrites the twins' views and writes the access-log rows.  A failure
anywhere leaves nothing behind.  The stateless forecast uses the same computation and
stores nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from serving.errors import BadInput, Unauthorized, Unavailable
from serving.forecasting import ForecastResult, forecast_batch, forecast_values
from serving.model_source import LoadedModel
from serving.served import ModelHolder
from serving.store import Store
from serving.store.access import access_row
from serving.store.identity import Claim, Ident
from serving.store.keys import REVOKED
from serving.store.risks import Level, levels
from serving.store.twins import (
    LOGICAL_ID_MAX,
    Appended,
    EventColumns,
    EventRow,
    History,
    TwinRow,
    event_arrays,
    event_rows,
    family,
    storable,
    utcnow,
)
from serving.views import forecast_json, twin_json

log = logging.getLogger("twincast.writes")
REFRESH_CALLER = "system:refresh"


@dataclass(frozen=True)
class Caller:
    """Who asks: a key's name and id (None for the system and CDS clients) and role;
    ``confirm``: the key as this worker remembers it, to be confirmed active in the
    transaction that acts for it (:meth:`Keys.revoked_among`)."""

    name: str
    key_id: int | None = None
    role: str = "system"
    user_id: int | None = None  # a person signed in to the pages (their name as ``name``)
    confirm: bool = False


@dataclass
class AccessInfo:
    """The request a write logs (``written`` once its rows are in the transaction)."""

    method: str
    path: str
    action: str
    written: bool = False

    def row(self, caller: Caller, subject_id: int) -> dict[str, Any]:
        """The access-log row of this request's successful touch of one twin."""
        return access_row(key_id=caller.key_id, key_name=caller.name, role=caller.role,
                          method=self.method, path=self.path, action=self.action,
                          subject_id=subject_id, status_code=200,
                          user_id=getattr(caller, "user_id", None))


@dataclass
class TwinInput:
    """One twin's part of a write: a known id (native routes) or identifiers to resolve
    (FHIR, CDS), the events (naive UTC) and an optional as-of time; ``caller`` and
    ``access`` when this part is its own request's (coalesced writes), else the batch's."""

    subject_id: int | None = None
    identifiers: tuple[Ident, ...] = ()
    events: Sequence[EventRow] = ()
    as_of: datetime | None = None
    label: str = ""
    caller: Caller | None = None
    access: AccessInfo | None = None


@dataclass
class TwinOutcome:
    subject_id: int
    label: str
    added: int
    duplicates: int
    created: bool
    forecast: dict[str, Any]
    view: str
    superseded: int = 0  # stored events taken back by corrected or retracted resources


class Activity:
    """When clinical writes last ran in this process (the refresh yields to them)."""

    def __init__(self) -> None:
        self.inflight = 0
        self.last = 0.0
        self._lock = threading.Lock()

    def busy(self, within: float) -> bool:
        return self.inflight > 0 or time.monotonic() - self.last < within

    def __enter__(self) -> Activity:
        with self._lock:
            self.inflight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.inflight -= 1
            self.last = time.monotonic()


NEW_ID = 2**62  # ids of events not stored yet: after every stored one, in arrival order
HISTORY_CACHE_BYTES = 64 * 2**20  # per worker


class HistoryCache:
    """Each twin's live events as this worker last wrote them, so that a twin's next
    write need not read its whole history again.

    An entry is keyed by the twin row's event count and forecast chain head, which every
    change to a twin's events moves (a write forecasts it and so moves the head; the
    bulk import changes the count); it is used only when the row, read in the plan's own
    snapshot, still shows that key, and the commit checks the same key again under the
    twin's lock.  So an entry is either exactly what the store holds or not used: other
    workers' writes, corrections, imports and restarts just make it miss.  An entry also
    keeps the twin's row as this worker wrote it, so that a write that only appends can
    be planned with no read at all (:meth:`trusted`): the commit's check under the lock
    is what makes that safe — and, for a twin written alone, the history built from
    those events, which its next write extends in place (:meth:`History.appended`).
    Least recently used entries go first beyond ``max_bytes`` (arrays, texts and the
    kept history's arrays and values counted)."""

    def __init__(self, max_bytes: int = HISTORY_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[int, str | None, EventColumns,
                                              datetime | None, int, TwinRow | None,
                                              History | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, twin: TwinRow) -> tuple[EventColumns, datetime | None] | None:
        with self._lock:
            entry = self._entries.get(twin.subject_id)
            if entry is None or entry[0] != twin.event_count \
                    or entry[1] != twin.forecast_head:
                self.misses += 1
                return None
            self._entries.move_to_end(twin.subject_id)
            self.hits += 1
            return entry[2], entry[3]

    def trusted(self, subject_ids: Sequence[int]
                ) -> dict[int, tuple[TwinRow, EventColumns, datetime | None, History | None]
                          ] | None:
        """Every one of these twins' row as this worker last wrote it, its events and
        (when kept) its history, or None unless all are here (unverified: the commit
        checks the row under the lock, and the writer counts a hit or a miss by what it
        found)."""
        with self._lock:
            entries = [self._entries.get(sid) for sid in subject_ids]
            if any(e is None or e[5] is None for e in entries):
                return None
            for sid in subject_ids:
                self._entries.move_to_end(sid)
            return {sid: (e[5], e[2], e[3], e[6]) for sid, e in zip(subject_ids, entries,
                                                                    strict=True)}

    def count(self, *, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def put(self, subject_id: int, count: int, head: str | None, cols: EventColumns,
            superseded: datetime | None, row: TwinRow | None = None,
            history: History | None = None) -> None:
        size = cols.nbytes()
        if len(cols) != count or size > self.max_bytes // 8:
            self.drop(subject_id)
            return
        if history is not None:  # kept while the entry stays within its bound
            extra = history.nbytes()
            history = history if size + extra <= self.max_bytes // 8 else None
            size += extra if history is not None else 0
        with self._lock:
            old = self._entries.pop(subject_id, None)
            self._bytes -= old[4] if old is not None else 0
            self._entries[subject_id] = (count, head, cols, superseded, size, row, history)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone[4]

    def drop(self, subject_id: int) -> None:
        with self._lock:
            old = self._entries.pop(subject_id, None)
            self._bytes -= old[4] if old is not None else 0


class StalePlan(Exception):
    """A twin changed between the read and the write: compute under the locks instead."""


@dataclass
class _Plan:
    ids: list[int]
    now: datetime
    existed: dict[int, bool]
    counts: dict[int, int]  # events stored when read (the commit checks them)
    fresh: list[dict[str, Any]]  # event rows to insert
    added: dict[int, int]
    sent: dict[int, int]
    forecasts: list[dict[str, Any]]
    views: list[dict[str, Any]]
    out: dict[int, tuple[dict[str, Any], str]]
    heads: dict[int, str | None]  # each twin's forecast chain head when read
    history: dict[int, tuple[EventColumns, datetime | None]]  # forecast twins' events
    created_at: dict[int, datetime] = field(default_factory=dict)
    trusted: bool = False  # planned from the cache alone, with no read
    built: History | None = None  # the history forecast, when the plan had one twin
    new_heads: dict[int, str] = field(default_factory=dict)  # set by the commit


class ModelBehind(Exception):
    """This worker's model is not the served version: reload, then run again."""

    def __init__(self, version: str):
        super().__init__(version)
        self.version = version


class TwinWriter:
    def __init__(self, store: Store, models: ModelHolder, *,
                 failpoints: frozenset[str] = frozenset(),
                 clock: Callable[[], datetime] = utcnow):
        """``clock``: what "now" is for the rows a write stores (events' ``recorded_at``,
        forecasts' ``created_at``) — the wall clock, or a replay's simulated one."""
        self.store = store
        self.models = models
        self.failpoints = failpoints
        self.clock = clock
        self.activity = Activity()
        self.cache = HistoryCache()
        self._levels: tuple[LoadedModel, dict[int, Level]] | None = None

    # ------------------------------------------------------------------ writes
    def write(self, inputs: list[TwinInput], caller: Caller, access: AccessInfo | None,
              *, source: str | None = None) -> list[TwinOutcome]:
        """Apply a batch in one transaction; outcomes in input order.

        Twins named by id are forecast before the write lock is taken, from what the
        store holds plus the new events; the write transaction then checks under the
        twins' locks that nothing changed meanwhile (the same event count and forecast
        chain head: every other change to a twin's events forecasts it, bar the bulk
        import, which only appends) and stores it all.  If something did change — or the
        batch names patients by identifier, or revises resources (events with a logical
        id) — everything is computed under the locks."""
        check_events(inputs)
        for inp in inputs:  # each part knows who asked and what to log
            inp.caller = inp.caller or caller
            inp.access = inp.access or access
        known = [inp.subject_id for inp in inputs if inp.subject_id is not None]
        if len(set(known)) != len(known):
            raise BadInput("a twin appears twice in one request: send its events together",
                           ["body"])
        # the plan appends only: revisions are decided under the twins' locks
        revises = any(e.logical_id is not None or e.retract
                      for inp in inputs for e in inp.events)
        with self.activity:
            for _ in range(3):
                model = self.models.current()
                try:
                    # planned from the cache (when it holds every twin), then from a read
                    for trust in (True, False) if len(known) == len(inputs) \
                            and not revises else ():
                        plan = self._plan(model, inputs, source, trust=trust)
                        try:
                            out = self.store.db.transact(
                                lambda s, m=model, p=plan: self._commit(s, m, p, inputs))
                        except StalePlan:  # a concurrent write to one of the twins, or a
                            if plan.trusted:  # re-sent event: read it (then the locks)
                                self.cache.count(hits=0, misses=len(known))
                                continue
                            break
                        if plan.trusted:
                            self.cache.count(hits=len(known), misses=0)
                        self._keep(plan)
                        return out
                    for inp in inputs:  # written under the locks: their entries are stale
                        if inp.subject_id is not None:
                            self.cache.drop(inp.subject_id)
                    return self.store.db.transact(
                        lambda s, m=model: self._write(s, m, inputs, source))
                except ModelBehind as behind:
                    self.models.sync_to(behind.version)
        raise Unavailable("the served model changed repeatedly during this request")

    def _plan(self, model: LoadedModel, inputs: list[TwinInput], source: str | None, *,
              trust: bool = False) -> _Plan:
        """Everything the write will store, computed from a read of the store (or, with
        ``trust``, from this worker's cache alone when it holds every twin)."""
        ids = [inp.subject_id for inp in inputs]
        now = self.clock()
        rows, sent = event_rows({sid: inp.events for sid, inp in zip(ids, inputs, strict=True)},
                                source=_sources(ids, inputs, source), now=now)
        # every twin written last by this worker and every part sending events: planned
        # from the cache with no read — a twin changed since, or an event re-sent, makes
        # the commit's check under the locks refuse the plan, and it is done under them
        trusted = self.cache.trusted(ids) if trust and all(inp.events for inp in inputs) \
            else None
        with contextlib.nullcontext() if trusted else self.store.read() as s:
            if trusted:
                twins = {sid: row for sid, (row, _, _, _) in trusted.items()}
                existing: set[tuple[int, str]] = set()
            else:  # one snapshot on SQLite; counts are checked anyway
                twins = self.store.twins.peek(s, ids)
                existing = self.store.twins.existing_keys(
                    s, rows, {sid: t.event_count for sid, t in twins.items()})
            fresh = [r for r in rows if (r["subject_id"], r["idempotency_key"]) not in existing]
            added = dict.fromkeys(ids, 0)
            for r in fresh:
                added[r["subject_id"]] += 1
            if not trusted:  # the views of the twins this write may leave as they are
                same = [sid for sid, inp in zip(ids, inputs, strict=True)
                        if sid in twins and added[sid] == 0 and inp.as_of is None]
                for sid, view in self.store.twins.views(s, same).items():
                    twins[sid].view = view
            redo = [(sid, inp) for sid, inp in zip(ids, inputs, strict=True)
                    if sid not in twins or not _unchanged(twins[sid], added[sid], inp.as_of,
                                                          model)]
            if trusted:
                kept = {sid: (cols, sup) for sid, (_, cols, sup, _) in trusted.items()}
            else:
                kept = {sid: hit for sid, _ in redo if sid in twins
                        and (hit := self.cache.get(twins[sid])) is not None}
            read = [sid for sid, _ in redo if sid not in kept]  # none when trusted
            stored = EventColumns.from_rows(self.store.twins.history_rows(s, read))
            superseded = self.store.twins.last_superseded(s, read)
        counts = {sid: t.event_count for sid, t in twins.items()}
        for sid in read:
            counts[sid] = 0
        for sid, n in zip(*np.unique(stored.sid, return_counts=True), strict=True):
            counts[int(sid)] = int(n)
        again = {sid for sid, _ in redo}
        stamp = now.isoformat()  # times as text, as the store's rows come (parsed faster)
        new = EventColumns.from_rows(
            [(r["subject_id"], r["time"] and r["time"].isoformat(), r["code"],
              r["numeric_value"], r["text_value"], NEW_ID + k, stamp)
             for k, r in enumerate(fresh) if r["subject_id"] in again])
        superseded.update({sid: sup for sid, (_, sup) in kept.items() if sup is not None})
        cols = EventColumns.concat([stored, *(c for c, _ in kept.values()), new])
        # one twin written last by this worker: its kept history, extended in place
        prior = trusted[ids[0]][3] if trusted and len(ids) == 1 and ids[0] in again else None
        history = prior.appended(new) if prior is not None else None
        if history is None:
            history = History.from_columns(cols, superseded)
        results = forecast_batch(model, history.arrays, [sid for sid, _ in redo],
                                 [inp.as_of for _, inp in redo])
        created_at = {sid: twins[sid].created_at if sid in twins else now for sid in ids}
        forecasts, views, out = self._rows(model, created_at, history, results,
                                           _callers(ids, inputs), now)
        out.update({sid: (json.loads(twins[sid].view)["forecast"], twins[sid].view)
                    for sid in ids if sid not in again})  # left as they are
        return _Plan(ids, now, {sid: sid in twins for sid in ids}, counts, fresh, added,
                     sent, forecasts, views, out,
                     {sid: twins[sid].forecast_head if sid in twins else None for sid in ids},
                     {sid: (part, superseded.get(sid)) for sid, part
                      in (cols.by_subject() if len(again) > 1 else
                          dict.fromkeys(again, cols)).items() if sid in again}, created_at,
                     trusted is not None, history if len(ids) == 1 else None)

    def _commit(self, s: Session, model: LoadedModel, plan: _Plan, inputs: list[TwinInput]
                ) -> list[TwinOutcome]:
        self._confirm(s, inputs)
        # no views: the plan holds every answer (a twin left as it is keeps the view it
        # read, which its unchanged forecast head vouches for)
        twins = self.store.twins.lock(s, plan.ids, create=True, now=plan.now)
        for sid in plan.ids:
            t = twins[sid]
            if t.created == plan.existed[sid] or t.event_count != plan.counts[sid] \
                    or t.forecast_head != plan.heads.get(sid):
                raise StalePlan  # changed since the read (events, or another forecast)
        self._check_served(s, model)
        # the counts are unchanged under the locks, so the plan's new events are new
        if self.store.twins.insert_new_events(s, plan.fresh) != len(plan.fresh):
            raise StalePlan
        added = plan.added
        self._failpoint("after_events")
        heads = self.store.twins.add_forecasts(s, plan.forecasts, plan.heads)
        self.store.twins.write_views(s, plan.views, heads)
        self._risks(s, model, plan.forecasts, plan.views, plan.now, refresh=False,
                    explicit=_explicit(plan.ids, inputs))
        self._log(s, plan.ids, inputs)
        self._failpoint("before_commit")
        plan.new_heads = heads
        return [_outcome(sid, "", Appended(added[sid], plan.sent[sid] - added[sid]),
                         twins[sid], twins[sid].created, plan.out) for sid in plan.ids]

    def _keep(self, plan: _Plan) -> None:
        """After the commit: the forecast twins' events, under their new key (the write
        is stored whatever happens here: a failure only leaves the twins uncached)."""
        try:
            self._keep_all(plan)
        except Exception as exc:
            log.error("keeping the written histories failed (%s): not cached",
                      type(exc).__name__)
            for sid in plan.history:
                self.cache.drop(sid)

    def _keep_all(self, plan: _Plan) -> None:
        views = {u["sid"]: u for u in plan.views}
        for sid, (cols, superseded) in plan.history.items():
            renumbered = cols
            if len(cols) and cols.eid.max() >= NEW_ID:
                # the new events after the stored ones, in arrival order (as the store's
                # ids put them): ids below NEW_ID, so the next write's new ones come last
                eid = cols.eid.copy()
                fresh = eid >= NEW_ID
                base = int(eid[~fresh].max(initial=0)) + 1
                eid[fresh] = base + np.argsort(np.argsort(eid[fresh]))
                renumbered = EventColumns(cols.sid, cols.t, cols.code, cols.value, cols.text,
                                          eid, cols.rec)
            count, head, u = plan.counts[sid] + plan.added[sid], plan.new_heads.get(sid), \
                views.get(sid)
            # the twin's row as this commit left it, bar the view (a plan from the cache
            # forecasts anew, so it never needs one; the cache's bound counts no view)
            row = None if u is None or u["n_events"] != count else TwinRow(
                sid, plan.created_at[sid], u["last_time"], count, u["mname"], u["mversion"],
                None, head)
            self.cache.put(sid, count, head, renumbered, superseded, row, plan.built)

    def _log(self, s: Session, ids: list[int], inputs: list[TwinInput]) -> None:
        """Each part's access row (who asked, through which request), in the write's
        transaction."""
        rows = [inp.access.row(inp.caller, sid)
                for sid, inp in zip(ids, inputs, strict=True) if inp.access is not None]
        self.store.access.add(s, rows)
        for inp in inputs:
            if inp.access is not None:
                inp.access.written = True

    def _write(self, s: Session, model: LoadedModel, inputs: list[TwinInput],
               source: str | None) -> list[TwinOutcome]:
        self._confirm(s, inputs)
        claims = {i: Claim(tuple(sorted(inp.identifiers)), f"patient {i + 1} of the request")
                  for i, inp in enumerate(inputs) if inp.subject_id is None}
        self.store.identities.resolve(s, list(claims.values()))
        self._failpoint("after_identifiers")
        ids = [inp.subject_id if inp.subject_id is not None else claims[i].subject_id
               for i, inp in enumerate(inputs)]
        if len(set(ids)) != len(ids):
            raise BadInput("a twin appears twice in one request: send its events together",
                           ["body"])
        now = self.clock()
        twins = self.store.twins.lock(s, ids, create=True, now=now, views=True)
        self._check_served(s, model)
        counts = self.store.twins.append_events(
            s, {sid: inp.events for sid, inp in zip(ids, inputs, strict=True)},
            source=_sources(ids, inputs, source), now=now)
        self._failpoint("after_events")
        # a re-sent batch changes nothing: the current forecast stands
        redo = [(sid, inp) for sid, inp in zip(ids, inputs, strict=True)
                if not _unchanged(twins[sid], counts[sid].added + counts[sid].superseded,
                                  inp.as_of, model)]
        fresh = self._forecast_and_persist(
            s, model, twins, [sid for sid, _ in redo], [inp.as_of for _, inp in redo],
            _callers(ids, inputs), now, _explicit(ids, inputs))
        self._log(s, ids, inputs)
        self._failpoint("before_commit")
        return [_outcome(sid, inp.label, counts[sid], twins[sid],
                         twins[sid].created or (i in claims and claims[i].created), fresh)
                for i, (sid, inp) in enumerate(zip(ids, inputs, strict=True))]

    def _confirm(self, s: Session, inputs: list[TwinInput]) -> None:
        """Every part's remembered key still active, or nothing is written (a batch of
        several callers is then tried part by part, so only the revoked key's fails)."""
        if self.store.keys.revoked_among(s, [inp.caller.key_id for inp in inputs
                                             if inp.caller.confirm]):
            raise Unauthorized(REVOKED)

    def _check_served(self, s: Session, model: LoadedModel) -> None:
        # FOR SHARE on PostgreSQL: a version change (FOR UPDATE) waits for this write
        served = self.store.jobs.served_version(s, model.name, lock=True)
        if served is not None and served != model.version:
            raise ModelBehind(served)

    def _forecast_and_persist(self, s: Session, model: LoadedModel, twins: dict[int, TwinRow],
                              ids: list[int], as_of: list[datetime | None],
                              callers: dict[int, Caller], now: datetime,
                              explicit: frozenset[int] = frozenset()
                              ) -> dict[int, tuple[dict[str, Any], str]]:
        if not ids:
            return {}
        history = self.store.twins.histories(s, ids)
        results = forecast_batch(model, history.arrays, ids, as_of)
        return self._persist(s, model, twins, history, results, callers, now,
                             explicit=explicit)

    def _persist(self, s: Session, model: LoadedModel, twins: dict[int, TwinRow],
                 history: History, results: list[ForecastResult],
                 callers: dict[int, Caller], now: datetime, *, refresh: bool = False,
                 explicit: frozenset[int] = frozenset()
                 ) -> dict[int, tuple[dict[str, Any], str]]:
        forecasts, views, out = self._rows(
            model, {sid: t.created_at for sid, t in twins.items()}, history, results,
            callers, now)
        heads = self.store.twins.add_forecasts(
            s, forecasts, {sid: t.forecast_head for sid, t in twins.items()})
        self.store.twins.write_views(s, views, heads)
        self._risks(s, model, forecasts, views, now, refresh=refresh, explicit=explicit)
        return out

    def _risks(self, s: Session, model: LoadedModel, forecasts: list[dict[str, Any]],
               views: list[dict[str, Any]], now: datetime, *, refresh: bool,
               explicit: frozenset[int] = frozenset()) -> None:
        """The twins' current risks and the alerts their new forecasts raise, by the
        served task's thresholds (the refresh's crossings after a model change are
        queued for review)."""
        cached = self._levels
        if cached is None or cached[0] is not model:
            cached = self._levels = (model, levels(model.bundle.task))
        self.store.risks.apply(s, forecasts, model.name, model.version, cached[1], now,
                               refresh=refresh, explicit=explicit,
                               last_times={u["sid"]: u["last_time"] for u in views})

    def _rows(self, model: LoadedModel, created_at: dict[int, datetime], history: History,
              results: list[ForecastResult], callers: dict[int, Caller], now: datetime):
        """Forecast rows, view updates and (forecast, view) per twin, to be stored."""
        rows, updates, out = [], [], {}
        for r in results:
            sid = r.subject_id
            caller = callers[sid]
            values = forecast_values(model, r, history.watermark.get(sid), caller.name,
                                     caller.key_id)
            values["created_at"] = now
            rows.append(values)
            fc = forecast_json(values)
            last = history.last_time.get(sid)
            n = history.count.get(sid, 0)
            view = twin_json(sid, created_at[sid], last, n, history.latest.get(sid, []), fc)
            updates.append({"sid": sid, "view": view, "mname": model.name,
                            "mversion": model.version, "n_events": n, "last_time": last,
                            "now": now})
            out[sid] = (fc, view)
        return rows, updates, out

    # ------------------------------------------------------------------ refresh
    def refresh(self, ids: list[int], model: LoadedModel) -> int:
        """Re-forecast twins with ``model``: histories read and forecasts computed outside
        any lock, then written in one short transaction for the twins that did not
        change meanwhile (the others stay stale for the next pass) and are not on
        ``model`` already (a re-run chunk, or another runner's, writes nothing twice).
        Returns how many were written; 0 when ``model`` is no longer the served version."""
        with self.store.read() as s:  # heads first: a change after them is seen below
            heads = {sid: t.forecast_head
                     for sid, t in self.store.twins.peek(s, ids).items()}
            history = self.store.twins.histories(s, ids)
        seen = {sid: history.count.get(sid, 0) for sid in ids}
        results = forecast_batch(model, history.arrays, ids, [None] * len(ids))

        def work(s: Session) -> int:
            twins = self.store.twins.lock(s, ids, create=False)
            if self.store.jobs.served_version(s, model.name, lock=True) != model.version:
                return 0
            # unchanged since the read (a correction keeps the count but moves the
            # head) and still stale, judged under the lock
            keep = [r for r in results if (t := twins.get(r.subject_id)) is not None
                    and t.event_count == seen[r.subject_id]
                    and t.forecast_head == heads.get(r.subject_id)
                    and (t.model_name, t.model_version) != (model.name, model.version)]
            system = Caller(REFRESH_CALLER)
            self._persist(s, model, twins, history, keep, dict.fromkeys(twins, system),
                          self.clock(), refresh=True)
            return len(keep)
        return self.store.db.transact(work, urgent=False)

    # ------------------------------------------------------------------ stateless
    def stateless(self, subject_id: int, events: Sequence[EventRow], as_of: datetime | None
                  ) -> dict[str, Any]:
        """A forecast from a supplied history, computed as a stored one is; stores nothing."""
        check_events([TwinInput(subject_id, events=events)])
        model = self.models.current_served()
        arrays = event_arrays([(subject_id, e.time, e.code, e.numeric_value, e.text_value,
                                i, None) for i, e in enumerate(events)])
        result = forecast_batch(model, arrays, [subject_id], [as_of])[0]
        return forecast_json(forecast_values(model, result, None, "stateless", None),
                             stored=False)

    def _failpoint(self, name: str) -> None:
        if name in self.failpoints:
            raise RuntimeError(f"failpoint {name}")


def _sources(ids: list[int], inputs: list[TwinInput], source: str | None
             ) -> dict[int, str]:
    """The source recorded on events that name none: the adapter's, else who sent them."""
    return {sid: source or inp.caller.name for sid, inp in zip(ids, inputs, strict=True)}


def _explicit(ids: list[int], inputs: list[TwinInput]) -> frozenset[int]:
    """The twins whose forecast is at an as-of time the request named."""
    return frozenset(sid for sid, inp in zip(ids, inputs, strict=True)
                     if inp.as_of is not None)


def _callers(ids: list[int], inputs: list[TwinInput]) -> dict[int, Caller]:
    return {sid: inp.caller for sid, inp in zip(ids, inputs, strict=True)}


def _outcome(sid: int, label: str, counts: Appended, twin: TwinRow, created: bool,
             fresh: dict[int, tuple[dict[str, Any], str]]) -> TwinOutcome:
    """A twin's answer: its new forecast, or (nothing changed) the one that stands."""
    if sid in fresh:
        fc, view = fresh[sid]
    else:
        view = twin.view
        fc = json.loads(view)["forecast"]
    return TwinOutcome(sid, label, counts.added, counts.duplicates, created, fc, view,
                       counts.superseded)


def _unchanged(twin: TwinRow, added: int, as_of: datetime | None, model: LoadedModel) -> bool:
    return (added == 0 and as_of is None and twin.view is not None and not twin.created
            and twin.model_version == model.version and twin.model_name == model.name)


def check_events(inputs: Sequence[TwinInput]) -> None:
    """Values a MEDS table can hold (finite, within float32): the route schemas check
    the same, this guards every other adapter.  A retraction names its resource, and a
    resource is not both sent and retracted in one part."""
    for i, inp in enumerate(inputs):
        where = ["body", *(["twins", i] if len(inputs) > 1 else []), "events"]
        retracted, sent = set(), set()
        for j, e in enumerate(inp.events):
            if not storable(e.numeric_value):
                raise BadInput("numeric value is not finite or outside the float32 range",
                               [*where, j, "numeric_value"])
            if e.logical_id is None:
                if e.retract:
                    raise BadInput("a retraction names the resource it takes back",
                                   [*where, j, "logical_id"])
                continue
            if not 0 < len(e.logical_id) <= LOGICAL_ID_MAX:
                raise BadInput(f"a logical id has 1 to {LOGICAL_ID_MAX} characters",
                               [*where, j, "logical_id"])
            (retracted if e.retract else sent).add(family(e.logical_id))
        if retracted & sent:
            raise BadInput("a resource is both sent and retracted in one request", where)
