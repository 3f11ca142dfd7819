"""The write path in process, against real databases: a failure at any step leaves
nothing behind (identifiers, twins, events, forecasts, access rows), and a PostgreSQL
deadlock is retried rather than answered."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from sqlalchemy import func, select, text

from serving.bootstrap import build_service
from serving.config import ServingConfig
from serving.errors import Conflict
from serving.store.models import AccessLog, Event, Forecast, Identifier, Twin
from serving.writes import AccessInfo, Caller, TwinInput
from tests.serving.conftest import event_rows
from tests.serving.test_service import history

TABLES = (Twin, Identifier, Event, Forecast, AccessLog)


def service(db_url: str, tracker, failpoints: frozenset[str] = frozenset()):
    """The service without its background threads: the champion served, no refresh."""
    svc = build_service(ServingConfig(
        database_url=db_url, tracking_uri=tracker.tracking_uri,
        artifact_root=tracker.artifact_root, task="eskd", model_poll_seconds=0,
        failpoints=failpoints), start=False)
    svc.models.follow_champion("test")
    return svc


def at_once(one, n: int, timeout: float = 120) -> None:
    """``one(k)`` for k in range(n), each in its own thread (they meet at a barrier)."""
    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"


def counts(store) -> dict[str, int]:
    with store.read() as s:
        return {t.__tablename__: s.execute(select(func.count()).select_from(t)).scalar_one()
                for t in TABLES}


@pytest.mark.parametrize("failpoint", ["after_identifiers", "after_events", "before_commit"])
def test_a_failure_at_any_step_leaves_nothing(database, tracker, trained, small_cohort,
                                              failpoint):
    """A batch with a new patient (computed under the locks)."""
    events = event_rows(history(small_cohort, trained, 0))
    ident = (("urn:test:mrn", uuid.uuid4().hex),)
    batch = [TwinInput(identifiers=ident, events=events, label="new patient"),
             TwinInput(4_000_001, events=events[:5])]
    access = AccessInfo("POST", "/v1/fhir", "fhir_bundle")
    broken = service(database, tracker, frozenset({failpoint}))
    before = counts(broken.store)
    with pytest.raises(RuntimeError, match=failpoint):
        broken.writer.write(batch, Caller("ward"), access)
    assert counts(broken.store) == before
    broken.store.dispose()
    fine = service(database, tracker)
    out = fine.writer.write(batch, Caller("ward"), access)
    after = counts(fine.store)
    assert after["twins"] == before["twins"] + 2 and after["identifiers"] == 1
    assert after["events"] == len(events) + 5 and after["forecasts"] == 2
    assert after["access_log"] == before["access_log"] + 2
    assert out[0].created and out[0].subject_id >= 2**52
    # identifiers already linked to two different twins: a conflict that writes nothing
    other = (("urn:test:mrn", uuid.uuid4().hex),)
    second = fine.writer.write([TwinInput(identifiers=other, events=events[:2])],
                               Caller("ward"), access)[0]
    assert second.subject_id != out[0].subject_id
    after = counts(fine.store)
    fresh = ("urn:test:mrn", uuid.uuid4().hex)
    clash = [TwinInput(identifiers=(ident[0], fresh, other[0]), events=events[:1])]
    with pytest.raises(Conflict, match=str(second.subject_id)):
        fine.writer.write(clash, Caller("ward"), access)
    assert counts(fine.store) == after
    fine.store.dispose()


@pytest.mark.parametrize("failpoint", ["after_events", "before_commit"])
def test_a_failure_after_forecasting_ahead_leaves_nothing(database, tracker, trained,
                                                          small_cohort, failpoint):
    """Twins named by id are forecast before the lock; a failure in the write still
    leaves nothing, and the same batch then goes through."""
    events = event_rows(history(small_cohort, trained, 1))
    batch = [TwinInput(4_100_001, events=events), TwinInput(4_100_002, events=events[:3])]
    broken = service(database, tracker, frozenset({failpoint}))
    before = counts(broken.store)
    with pytest.raises(RuntimeError, match=failpoint):
        broken.writer.write(batch, Caller("ward"), AccessInfo("POST", "/v1/twins:bulk", "b"))
    assert counts(broken.store) == before
    broken.store.dispose()
    fine = service(database, tracker)
    out = fine.writer.write(batch, Caller("ward"), AccessInfo("POST", "/v1/twins:bulk", "b"))
    assert [o.added for o in out] == [len(events), 3] and all(o.created for o in out)
    again = fine.writer.write(batch, Caller("ward"), None)
    assert [o.added for o in again] == [0, 0]
    assert [o.forecast["forecast_id"] for o in again] == [o.forecast["forecast_id"] for o in out]
    assert counts(fine.store)["forecasts"] == before["forecasts"] + 2
    fine.store.dispose()


def test_a_postgresql_deadlock_is_retried(pg_database, tracker, trained):
    svc = service(pg_database, tracker)
    db = svc.store.db
    with db.write() as s:
        s.execute(text("CREATE TABLE locks (id int primary key)"))
        s.execute(text("INSERT INTO locks VALUES (1), (2)"))
    attempts = {1: 0, 2: 0}
    barrier = threading.Barrier(2, timeout=30)

    def work(first: int, second: int):
        def run(s):
            attempts[first] += 1
            s.execute(text("SELECT id FROM locks WHERE id = :i FOR UPDATE"), {"i": first})
            if attempts[first] == 1:
                barrier.wait()  # both hold their first row: the next lock deadlocks
            s.execute(text("SELECT id FROM locks WHERE id = :i FOR UPDATE"), {"i": second})
            time.sleep(0.05)
            return first
        return db.transact(run)

    results = {}
    threads = [threading.Thread(target=lambda a=a, b=b: results.setdefault(a, work(a, b)))
               for a, b in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {1: 1, 2: 2}  # both went through
    assert sorted(attempts.values()) == [1, 2]  # PostgreSQL aborted one; it ran again
    svc.store.dispose()


def test_a_plan_overtaken_by_another_write_is_refused_and_redone(database, tracker, trained,
                                                                 small_cohort):
    from serving.writes import StalePlan

    svc = service(database, tracker)
    events = event_rows(history(small_cohort, trained, 2))
    w, caller = svc.writer, Caller("ward")
    w.write([TwinInput(4_200_001, events=events[:-2])], caller, None)
    model = svc.models.current()
    planned = [TwinInput(4_200_001, events=events[-2:-1], caller=caller)]
    plan = w._plan(model, planned, None)
    w.write([TwinInput(4_200_001, events=events[-1:])], caller, None)  # overtakes the plan
    with pytest.raises(StalePlan):
        svc.store.db.transact(lambda s: w._commit(s, model, plan, planned))
    out = w.write([TwinInput(4_200_001, events=events[-2:-1])], caller, None)[0]
    assert out.added == 1
    full = w.stateless(4_200_001, events, None)  # the whole history, nothing stored
    assert out.forecast["risks"] == full["risks"] and out.forecast["as_of"] == full["as_of"]
    assert json.loads(out.view)["event_count"] == len(events)
    svc.store.dispose()


def test_a_stale_alias_read_never_moves_the_served_version_back(database, tracker, trained,
                                                                tmp_path):
    """Worker A read the alias (version 1), then waited for the served row's lock while
    the champion moved and worker B adopted the move: A's adoption must not undo it."""
    import shutil

    from serving.store.jobs import AliasMoved
    from training.registry import CHAMPION, model_name
    from training.tracking import Tracker

    src = tracker.tracking_uri.removeprefix("sqlite:///")
    shutil.copy(src, tmp_path / "mlflow.db")  # promotions here touch no other test
    copy = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tracker.artifact_root)
    a, b = service(database, copy), service(database, copy)
    name = model_name("eskd")
    first = a.models.current()
    champ = copy.registry.version_by_alias(name, CHAMPION)
    mv = copy.registry.register(name, champ.source, champ.run_id, {"family": "copy"})
    copy.registry.promote(name, str(mv.version), actor="test", kind="manual",
                          reason="newer", task_name="eskd")
    changed, job = b.models.follow_champion("alias moved")
    assert changed and job is not None
    with pytest.raises(AliasMoved):  # A's stale read, confirmed under the lock
        a.store.jobs.adopt(name, first.version, first.run_id, "worker-a", "stale read",
                           confirm=a.models.source.champion_version)
    with a.store.read() as s:
        assert a.store.jobs.served_version(s, name) == str(mv.version)
    assert a.store.jobs.latest(name).model_version == str(mv.version)
    changed, _ = a.models.follow_champion("alias moved")  # A then follows the real alias
    assert changed and a.models.current().version == str(mv.version)
    a.store.dispose()
    b.store.dispose()


def test_concurrent_one_twin_writes_go_as_one_batch_and_keep_their_own_callers(
        database, tracker, trained, small_cohort):
    from serving.errors import BadInput
    from serving.store.twins import EventRow

    svc = service(database, tracker)
    n = 12
    sids = [4_300_000 + k for k in range(n)]
    bad = 4_300_000 + 5  # this part sends a value no MEDS table can hold
    barrier = threading.Barrier(n, timeout=30)
    results: dict[int, object] = {}

    def one(k: int) -> None:
        sid = sids[k]
        events = event_rows(history(small_cohort, trained, k % 6))
        if sid == bad:
            events = [*events, EventRow(events[-1].time, "LAB//EGFR", 1e300, None)]
        inp = TwinInput(sid, events=events, caller=Caller(f"ward-{k}", None, "clinical"),
                        access=AccessInfo("POST", f"/v1/twins/{sid}/events", "ingest_events"))
        barrier.wait()
        try:
            results[sid] = svc.coalescer.write(inp)
        except BadInput as exc:
            results[sid] = exc

    at_once(one, n)
    assert isinstance(results[bad], BadInput)  # its own error, nobody else's
    good = [s for s in sids if s != bad]
    assert all(results[s].subject_id == s and results[s].added > 0 for s in good)
    assert svc.coalescer.parts >= n and svc.coalescer.batches < svc.coalescer.parts
    with svc.store.read() as s:
        asked = sorted(s.execute(select(Forecast.subject_id, Forecast.requested_by)
                                 .where(Forecast.subject_id.in_(sids))).all())
        logged = sorted(s.execute(select(AccessLog.subject_id, AccessLog.key_name)
                                  .where(AccessLog.subject_id.in_(sids))).all())
        stored = s.execute(select(func.count()).select_from(Event)
                           .where(Event.subject_id == bad)).scalar_one()
    expected = [(s, f"ward-{k}") for k, s in enumerate(sids) if s != bad]
    assert asked == expected and logged == expected and stored == 0  # one row each
    for k, sid in enumerate(sids):  # each answer is that patient's own forecast
        if sid != bad:
            alone = svc.writer.stateless(sid, event_rows(history(small_cohort, trained,
                                                                 k % 6)), None)
            assert results[sid].forecast["subject_id"] == sid
            assert results[sid].forecast["risks"] == alone["risks"]
    svc.store.dispose()


def _same_history(got, want) -> None:
    """Two histories of one twin: the model's input and the view's parts alike."""
    import numpy as np

    for k in ("subject_id", "time_us", "code", "value"):
        assert np.array_equal(getattr(got.arrays, k), getattr(want.arrays, k),
                              equal_nan=k == "value"), k
    assert got.arrays.categories == want.arrays.categories
    assert got.latest == want.latest and got.watermark == want.watermark
    assert got.count == want.count and got.last_time == want.last_time


def test_concurrent_logged_reads_share_a_commit_and_each_get_their_own_twin(
        database, tracker, trained, small_cohort):
    """GETs at once: each answer is its own twin's view (a missing twin's is its own
    404), one access row per answered read under its own caller, fewer commits than
    reads."""
    from serving.errors import NotFound

    svc = service(database, tracker)
    sids = [4_400_000 + k for k in range(8)]
    svc.writer.write([TwinInput(sid, events=event_rows(history(small_cohort, trained, k)))
                      for k, sid in enumerate(sids)], Caller("seed"), None)
    missing = 4_400_999
    asks = [*sids, missing] * 4
    n = len(asks)
    barrier = threading.Barrier(n, timeout=30)
    answers: dict[int, object] = {}
    infos: dict[int, AccessInfo] = {}

    def one(k: int) -> None:
        info = infos[k] = AccessInfo("GET", f"/v1/twins/{asks[k]}", "read_twin")
        barrier.wait()
        try:
            answers[k] = json.loads(svc.twin_view(asks[k], Caller(f"reader-{k}"), info))
        except NotFound as exc:
            answers[k] = exc

    at_once(one, n)
    reads = svc.view_reads
    assert reads.parts == n and reads.batches < n  # reads shared transactions
    for k, sid in enumerate(asks):
        if sid == missing:
            assert isinstance(answers[k], NotFound) and not infos[k].written
        else:
            assert answers[k]["subject_id"] == sid and infos[k].written
    with svc.store.read() as s:
        logged = sorted(s.execute(select(AccessLog.subject_id, AccessLog.key_name)
                                  .where(AccessLog.action == "read_twin",
                                         AccessLog.subject_id.in_([*sids, missing]))).all())
    assert logged == sorted((sid, f"reader-{k}") for k, sid in enumerate(asks)
                            if sid != missing)
    svc.store.dispose()


def test_a_worker_keeps_a_twins_history_exactly_as_the_store_holds_it(
        database, tracker, trained, small_cohort, monkeypatch):
    """The history cache: what a worker keeps of a twin after each write equals what the
    store then holds (new events last, a later value at the same time winning); another
    worker's write, a correction and an import each make it miss, never serve stale
    events; every forecast equals the stateless one over the whole history."""
    from datetime import timedelta

    import pandas as pd

    from serving.imports import import_events
    from serving.store.twins import EventRow, History

    events = event_rows(history(small_cohort, trained, 3))
    sid, caller = 4_300_001, Caller("ward")
    one, other = service(database, tracker), service(database, tracker)
    extended = []  # the kept histories each cached write extended in place
    appended = History.appended

    def counted(self, new):
        got = appended(self, new)
        extended.append(got is not None)
        return got

    monkeypatch.setattr(History, "appended", counted)
    last = max(e.time for e in events if e.time is not None)
    sent: list = []

    def post(svc, evs):
        sent.extend(e for e in evs if e.logical_id is None)
        return svc.writer.write([TwinInput(sid, events=evs)], caller, None)[0]

    def check(svc, out):
        kept = svc.writer.cache._entries.get(sid)
        with svc.store.read() as s:
            want = svc.store.twins.histories(s, [sid])
        if kept is not None:
            _same_history(History.from_columns(kept[2], {sid: kept[3]} if kept[3] else {}),
                          want)
            if kept[6] is not None:  # the history itself, extended in place by each write
                _same_history(kept[6], want)
        full = svc.writer.stateless(sid, sent, None)
        assert out.forecast["risks"] == full["risks"]
        assert json.loads(out.view)["event_count"] == want.count[sid]

    check(one, post(one, events[:-6]))
    for k in range(3):  # one event a write: each plan reads the twin from the cache
        check(one, post(one, [events[-6 + k]]))
    assert one.writer.cache.hits == 3
    assert extended == [True] * 3  # each one-event write: in place, and checked above
    # a write that fails before its commit leaves the kept entry as it was
    kept = one.writer.cache._entries[sid][:2]
    one.writer.failpoints = frozenset({"before_commit"})
    with pytest.raises(RuntimeError, match="before_commit"):
        one.writer.write([TwinInput(sid, events=[events[-3]])], caller, None)
    one.writer.failpoints = frozenset()
    assert one.writer.cache._entries[sid][:2] == kept
    # the same code at the same time, a new value: the later arrival is the latest value
    t = last + timedelta(days=1)
    check(one, post(one, [EventRow(t, "LAB//EGFR", 31.0, None)]))
    out = post(one, [EventRow(t, "LAB//EGFR", 29.5, None)])
    check(one, out)
    egfr = [v for v in json.loads(out.view)["latest_values"] if v["code"] == "LAB//EGFR"]
    assert egfr[0]["numeric_value"] == 29.5
    hits = one.writer.cache.hits
    # another worker writes the twin: the first one's entry is stale and must miss
    check(other, post(other, [events[-3]]))
    check(one, post(one, [events[-2]]))
    assert one.writer.cache.hits == hits
    # the bulk import appends behind every worker's back: the count moves, a miss
    import_events(one.store, pd.DataFrame({
        "subject_id": [sid], "time": [last + timedelta(days=2)], "code": ["VITAL//SBP"],
        "numeric_value": [140.0], "text_value": [None]}))
    sent.append(EventRow(last + timedelta(days=2), "VITAL//SBP", 140.0, None))
    check(one, post(one, [events[-1]]))
    assert one.writer.cache.hits == hits
    # a resource corrected: the count stays, the head moves — the kept entry (with the
    # old value) must not be used
    fixed = EventRow(last + timedelta(days=3), "LAB//UACR", 80.0, None,
                     logical_id="Observation/u1")
    post(one, [fixed])
    sent.append(EventRow(last + timedelta(days=3), "LAB//UACR", 80.0, None))
    check(one, post(one, [EventRow(last + timedelta(days=3, hours=1), "VITAL//SBP", 128.0,
                                   None)]))
    assert sid in one.writer.cache._entries  # the entry holds the value about to change
    post(one, [EventRow(last + timedelta(days=3), "LAB//UACR", 60.0, None,
                        logical_id="Observation/u1")])
    sent[-2] = EventRow(last + timedelta(days=3), "LAB//UACR", 60.0, None)
    hits = one.writer.cache.hits
    check(one, post(one, [EventRow(last + timedelta(days=4), "VITAL//SBP", 133.0, None)]))
    assert one.writer.cache.hits == hits
    one.store.dispose()
    other.store.dispose()


def test_a_write_planned_from_the_cache_alone_is_checked_under_the_lock(
        database, tracker, trained, small_cohort):
    """A twin this worker wrote last is planned with no read; an event re-sent to it is
    still a duplicate (no second row, no new forecast), and a write by another worker in
    between is seen: the forecast covers both workers' events."""
    events = event_rows(history(small_cohort, trained, 4))
    sid, caller = 4_300_101, Caller("ward")
    one, other = service(database, tracker), service(database, tracker)
    w = one.writer

    def write(svc, evs):
        cache = w.cache
        before = (cache.hits, cache.misses)
        out = svc.writer.write([TwinInput(sid, events=evs)], caller, None)[0]
        return out, (cache.hits - before[0], cache.misses - before[1])

    write(one, events[:-4])
    assert w.cache.trusted([sid]) is not None  # the row as this write left it
    nxt, seen = write(one, events[-4:-3])
    assert seen == (1, 0) and nxt.added == 1  # planned from the cache alone, no read
    again, seen = write(one, events[-4:-3])  # re-sent: the trusted plan is refused
    assert seen == (0, 1)  # then planned from a read: nothing new, nothing to forecast
    assert (again.added, again.duplicates) == (0, 1)
    assert w.cache.trusted([sid]) is not None  # the twin unchanged: its entry stands
    assert again.forecast["forecast_id"] == nxt.forecast["forecast_id"]
    write(other, events[-3:-2])  # another worker: the kept row is out of date
    out, seen = write(one, events[-2:])
    assert seen == (0, 2) and out.added == 2  # refused, then the entry missed too
    full = w.stateless(sid, events, None)  # the whole history, nothing stored
    assert out.forecast["risks"] == full["risks"]
    assert json.loads(out.view)["event_count"] == len(events)
    with one.store.read() as s:
        stored = s.execute(select(func.count()).select_from(Event)
                           .where(Event.subject_id == sid)).scalar_one()
        forecasts = s.execute(select(func.count()).select_from(Forecast)
                              .where(Forecast.subject_id == sid)).scalar_one()
    assert stored == len(events) and forecasts == 4
    one.store.dispose()
    other.store.dispose()


def test_float32_values_come_back_as_people_wrote_them(database, tracker, trained,
                                                       small_cohort):
    """MEDS holds values as float32: imported and explained, 88.1 shows as 88.1 in the
    JSON (not 88.0999984741211), and still reads back to the same float32; the stored
    values and their idempotency keys are as before, so a re-import adds nothing."""
    import numpy as np

    from serving.imports import import_events

    svc = service(database, tracker)
    frame = history(small_cohort, trained, 4).copy()
    frame["subject_id"] = 4_400_001
    frame["numeric_value"] = frame["numeric_value"].astype(np.float32)
    frame["text_value"] = None
    import_events(svc.store, frame)
    assert import_events(svc.store, frame)[1] == 0
    out = svc.writer.write([TwinInput(4_400_001, events=event_rows(frame.tail(1)))],
                           Caller("ward"), None)[0]
    view = json.loads(out.view)
    assert view["latest_values"] and out.forecast["contributions"]
    shown = [v["numeric_value"] for v in view["latest_values"] if v["numeric_value"] is not None]
    shown += [c["value"] for c in out.forecast["contributions"] if c["value"] is not None]
    for v in shown:  # the shortest decimal of its float32: no digit can be dropped
        assert repr(v) == str(np.float32(v)), v
    # and some of them are not whole numbers, or the check above proves nothing
    assert any(v != round(v) for v in shown)
    svc.store.dispose()


def test_a_key_revoked_elsewhere_fails_only_its_own_part_and_is_told_nothing(
        database, tracker, trained, small_cohort):
    """Keys the twin routes remember are confirmed in the transaction that acts for
    them: a key another worker revoked writes nothing and reads nothing (not even that
    a twin is missing), its batch neighbours are answered, and it is then forgotten."""
    from serving.errors import NotFound, Unauthorized
    from serving.writes import TwinOutcome

    svc, elsewhere = service(database, tracker), service(database, tracker)
    tag = uuid.uuid4().hex[:6]
    tokens = {who: svc.store.keys.create(f"{who}-{tag}", "clinical") for who in ("live", "gone")}
    keys = {who: svc.store.keys.recall(t) for who, t in tokens.items()}  # remembered
    callers = {who: Caller(k.name, k.id, k.role, confirm=True) for who, k in keys.items()}
    elsewhere.store.keys.revoke(keys["gone"].name)
    assert svc.store.keys.recall(tokens["gone"]) == keys["gone"]  # still remembered here
    events = event_rows(history(small_cohort, trained, 1))[:10]

    def part(sid: int, who: str) -> TwinInput:
        return TwinInput(sid, events=events, caller=callers[who],
                         access=AccessInfo("POST", f"/v1/twins/{sid}/events", "ingest_events"))

    before = counts(svc.store)
    out = svc.coalescer.group.apply([part(4_400_001, "live"), part(4_400_002, "gone")])
    assert isinstance(out[0], TwinOutcome) and out[0].added == 10
    assert isinstance(out[1], Unauthorized)
    after = counts(svc.store)
    assert after["events"] == before["events"] + 10 and after["twins"] == before["twins"] + 1
    assert after["access_log"] == before["access_log"] + 1  # the live key's row only

    def read(sid: int, who: str):
        return sid, callers[who], AccessInfo("GET", f"/v1/twins/{sid}", "read_twin")

    views = svc.view_reads.apply([read(4_400_001, "live"), read(4_400_001, "gone"),
                                  read(4_400_009, "gone"), read(4_400_009, "live")])
    assert json.loads(views[0])["subject_id"] == 4_400_001
    assert isinstance(views[1], Unauthorized) and isinstance(views[2], Unauthorized)
    assert isinstance(views[3], NotFound)
    assert counts(svc.store)["access_log"] == after["access_log"] + 1
    assert svc.store.keys.recall(tokens["gone"]) is None  # forgotten: read again, refused
    assert svc.store.keys.recall(tokens["live"]) == keys["live"]
    svc.store.dispose()
    elsewhere.store.dispose()


def test_a_key_revoked_elsewhere_gets_401_whatever_else_its_request_would_get(
        database, tracker, trained, small_cohort):
    """Through the routes (in process): a key this worker remembers, revoked by another,
    is told 401 — not the 422 of its bad body or path, the 404 of a missing twin or the
    403 of its role — and nothing is stored for it."""
    from starlette.testclient import TestClient

    from serving.api.app import create_app

    svc, elsewhere = service(database, tracker), service(database, tracker)
    app = create_app()
    app.state.service = svc
    sid = 4_500_001
    body = {"events": [{"time": "2021-01-01T10:00:00Z", "code": "LAB//EGFR",
                        "numeric_value": 40.0}]}
    cases = {  # role, the request a revoked key sends
        "bad body": ("clinical", "POST", f"/v1/twins/{sid}/events", {"events": "no"}),
        "bad id": ("clinical", "POST", "/v1/twins/-4/events", body),
        "missing twin": ("clinical", "GET", "/v1/twins/4599999", None),
        "role": ("auditor", "POST", f"/v1/twins/{sid}/events", body),
        "new event": ("clinical", "POST", f"/v1/twins/{sid}/events",
                      {"events": [{**body["events"][0], "time": "2021-02-01T10:00:00Z"}]}),
    }
    with TestClient(app) as client:
        def send(token: str, method: str, path: str, json_body=None):
            return client.request(method, path, json=json_body,
                                  headers={"Authorization": f"Bearer {token}"})

        setup = svc.store.keys.create(f"setup-{uuid.uuid4().hex[:6]}", "clinical")
        assert send(setup, "POST", f"/v1/twins/{sid}/events", body).status_code == 200
        for case, (role, method, path, sent) in cases.items():
            token = svc.store.keys.create(f"{role}-{uuid.uuid4().hex[:6]}", role)
            assert send(token, "GET", f"/v1/twins/{sid}").status_code == 200, case
            assert svc.store.keys.remembers(token), case
            elsewhere.store.keys.revoke(svc.store.keys.recall(token).name)
            before = counts(svc.store)["events"]
            r = send(token, method, path, sent)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (case, r.text)
            assert not svc.store.keys.remembers(token), case  # read again next time
            assert counts(svc.store)["events"] == before, case
        # the same requests from live keys get their own answers
        clinical = svc.store.keys.create(f"live-{uuid.uuid4().hex[:6]}", "clinical")
        auditor = svc.store.keys.create(f"live-{uuid.uuid4().hex[:6]}", "auditor")
        got = {case: send(clinical if role == "clinical" else auditor, method, path, sent)
               .status_code for case, (role, method, path, sent) in cases.items()}
        assert got == {"bad body": 422, "bad id": 422, "missing twin": 404, "role": 403,
                       "new event": 200}
    svc.store.dispose()
    elsewhere.store.dispose()


def test_stored_keys_are_found_alike_by_look_up_and_by_range_read(database, tracker, trained,
                                                                  small_cohort):
    """Which sent events a twin holds already: each key looked up, or all the twin's keys
    read (a large part of its history sent again) — the same answer: re-sends found, new
    events not, and each twin's own keys only."""
    from serving.store.twins import event_rows as store_rows

    svc = service(database, tracker)
    events = event_rows(history(small_cohort, trained, 2))
    a, b = 4_500_001, 4_500_002
    svc.writer.write([TwinInput(a, events=events[:-4]), TwinInput(b, events=events[-4:])],
                     Caller("seed"), None)
    now = svc.writer.clock()

    def keys(sid, evs):
        return {r["idempotency_key"] for r in store_rows({sid: evs}, source="x", now=now)[0]}

    rows, _ = store_rows({a: events, b: events[:-4]}, source="x", now=now)
    want = {(a, k) for k in keys(a, events) & keys(a, events[:-4])} | \
        {(b, k) for k in keys(b, events[:-4]) & keys(b, events[-4:])}
    with svc.store.read() as s:
        probed = svc.store.twins.existing_keys(s, rows)
        ranged = svc.store.twins.existing_keys(s, rows, {a: 1, b: 1})
        mixed = svc.store.twins.existing_keys(s, rows, {a: 1, b: 10**6})
    assert probed == ranged == mixed == want
    assert any(sid == a for sid, _ in want) and len(want) < len(rows)
    svc.store.dispose()


def test_a_batch_read_from_the_store_leaves_a_resent_twin_and_forecasts_the_other(
        database, tracker, trained, small_cohort):
    """A worker that has kept neither twin plans from a read of the store: the twin sent
    only what it holds keeps its forecast; the other's forecast covers its whole history
    (and only its own) — all without falling back to the locked path."""
    events = event_rows(history(small_cohort, trained, 3))
    a, b = 4_600_001, 4_600_002
    seed = service(database, tracker)
    first = {o.subject_id: o for o in seed.writer.write(
        [TwinInput(a, events=events), TwinInput(b, events=events[:-3])], Caller("seed"),
        None)}
    seed.store.dispose()
    fresh = service(database, tracker)  # nothing kept: the plan reads the store
    fresh.writer._write = lambda *a, **k: pytest.fail("the plan was refused")  # and holds
    out = {o.subject_id: o for o in fresh.writer.write(
        [TwinInput(a, events=events[2:6]), TwinInput(b, events=events[-3:])], Caller("ward"),
        None)}
    assert (out[a].added, out[a].duplicates) == (0, 4)
    assert out[a].forecast["forecast_id"] == first[a].forecast["forecast_id"]
    assert (out[b].added, out[b].duplicates) == (3, 0)
    assert out[b].forecast["forecast_id"] != first[b].forecast["forecast_id"]
    assert out[b].forecast["risks"] == fresh.writer.stateless(b, events, None)["risks"]
    assert json.loads(out[b].view)["event_count"] == len(events)
    fresh.store.dispose()


def test_many_rows_are_stored_as_row_by_row_writes_store_them(database, tracker, trained,
                                                               small_cohort, monkeypatch):
    """A batch large enough to go as one statement per table (PostgreSQL's binary arrays)
    stores what statements row by row store: the same events in the order sent, the same
    forecasts (JSON null for a twin not eligible), views and risk rows, and an intact
    forecast chain; on PostgreSQL a value too long for its column is refused, not cut."""
    from serving.store import arrays
    from serving.store.models import TwinRisk
    from serving.tamper import verify_chains

    svc = service(database, tracker)
    parts = [event_rows(history(small_cohort, trained, k)) for k in range(3)]
    n = arrays.MIN_ROWS + 4  # twins: every table's rows over the threshold

    def batch(base: int) -> list[TwinInput]:
        return [TwinInput(base + k, events=parts[k % 3] if k else parts[0][:1])
                for k in range(n)]  # twin 0: one event, not eligible

    def stored(base: int):
        ids = [base + k for k in range(n)]
        with svc.store.read() as s:
            ev = s.execute(select(Event.subject_id, Event.time, Event.code,
                                  Event.numeric_value, Event.text_value, Event.source)
                           .where(Event.subject_id.in_(ids)).order_by(Event.id)).all()
            fc = s.execute(select(Forecast.subject_id, Forecast.status, Forecast.reason,
                                  Forecast.risks, Forecast.contributions,
                                  Forecast.trajectories, Forecast.feature_digest,
                                  Forecast.as_of).where(Forecast.subject_id.in_(ids))
                           .order_by(Forecast.subject_id)).all()
            null = s.execute(text("SELECT risks IS NULL FROM forecasts WHERE subject_id = "
                                  f"{base}")).scalar_one()
            tw = s.execute(select(Twin.subject_id, Twin.event_count, Twin.last_event_time,
                                  Twin.model_version).where(Twin.subject_id.in_(ids))
                           .order_by(Twin.subject_id)).all()
            rk = s.execute(select(TwinRisk.subject_id, TwinRisk.horizon_days, TwinRisk.risk,
                                  TwinRisk.expires_at, TwinRisk.armed)
                           .where(TwinRisk.subject_id.in_(ids))
                           .order_by(TwinRisk.subject_id, TwinRisk.horizon_days)).all()
        shift = [(r[0] - base, *r[1:]) for r in ev], [(r[0] - base, *r[1:]) for r in fc], \
            [(r[0] - base, *r[1:]) for r in tw], [(r[0] - base, *r[1:]) for r in rk]
        return shift, null

    svc.writer.write(batch(4_700_000), Caller("ward"), None)
    monkeypatch.setattr(arrays, "MIN_ROWS", 10**9)  # row by row
    svc.writer.write(batch(4_800_000), Caller("ward"), None)
    monkeypatch.undo()
    (ev, fc, tw, rk), null = stored(4_700_000)
    assert stored(4_800_000) == ((ev, fc, tw, rk), null)
    want = [(k, *e[:4], "ward") for k in range(n) for e in (parts[k % 3] if k else
                                                               parts[0][:1])]
    assert ev == want  # every event, in the order sent (ids taken in it)
    assert fc[0][1] == "not_eligible" and fc[0][3] is None and not null  # JSON null
    assert all(f[1] == "ok" for f in fc[1:]) and len(rk) == 2 * (n - 1)
    assert verify_chains(svc.store)[1] == []
    if svc.store.db.sqlite:  # SQLite keeps any length: nothing more to check there
        svc.store.dispose()
        return
    long = [e._replace(code="LAB//" + "X" * 300) for e in parts[1]]
    before = counts(svc.store)
    with pytest.raises(Exception, match="too long"):
        svc.writer.write([TwinInput(4_900_000 + k, events=long) for k in range(n)],
                         Caller("ward"), None)
    assert counts(svc.store) == before
    svc.store.dispose()
