"""Corrected and retracted resources in the twin store, on SQLite and PostgreSQL: a new
version of a resource supersedes what it no longer holds, a retraction takes it all back,
a version seen before changes nothing, and a past forecast still replays exactly."""

from __future__ import annotations

import json
from datetime import timedelta

from alembic import command
from sqlalchemy import func, select, text

from serving.forecasting import forecast_batch
from serving.store.db import Database, _alembic_config
from serving.store.models import Event, Forecast, Twin
from serving.store.twins import EPOCH, EventRow, event_arrays, family
from serving.writes import Caller, TwinInput
from tests.serving.conftest import event_rows
from tests.serving.test_service import history
from tests.serving.test_writes import service

EGFR = "Observation/egfr-1"
SBP = "Observation/bp-1#http://loinc.org|8480-6"
DBP = "Observation/bp-1#http://loinc.org|8462-4"


def obs(logical_id: str, value: float, at, code: str = "LAB//EGFR") -> EventRow:
    """An event of a FHIR resource, as the FHIR adapter hands it over."""
    return EventRow(at, code, value, None, None, "fhir:" + family(logical_id), logical_id)


def retract(logical_id: str) -> EventRow:
    return EventRow(None, "", None, None, None, None, logical_id, retract=True)


def write(svc, sid: int, events: list[EventRow]):
    return svc.writer.write([TwinInput(sid, events=events)], Caller("ward"), None)[0]


def base(svc, small_cohort, trained, sid: int, k: int):
    """A twin with a held-out subject's history; returns (its events, a time after them)."""
    events = event_rows(history(small_cohort, trained, k))
    write(svc, sid, events)
    return events, max(e.time for e in events if e.time is not None) + timedelta(days=30)


def latest(svc, sid: int) -> dict[str, float | None]:
    with svc.store.read() as s:
        return {v["code"]: v["numeric_value"]
                for v in svc.store.twins.histories(s, [sid]).latest[sid]}


def at_time(svc, sid: int, when, recorded_upto=None) -> list[tuple[str, float | None]]:
    """The twin's (code, value) pairs at one event time (live, or live at a past time)."""
    with svc.store.read() as s:
        h = svc.store.twins.histories(s, [sid], recorded_upto=recorded_upto)
    a = h.arrays
    at = (when - EPOCH) // timedelta(microseconds=1)
    return sorted((a.categories[c], round(v, 3)) for t, c, v in
                  zip(a.time_us.tolist(), a.code.tolist(), a.value.tolist(), strict=True)
                  if t == at)


def stored(svc, sid: int) -> tuple[int, int]:
    """(the twin's event_count, its forecast rows)."""
    with svc.store.read() as s:
        n = s.execute(select(Twin.event_count).where(Twin.subject_id == sid)).scalar_one()
        f = s.execute(select(func.count()).select_from(Forecast)
                      .where(Forecast.subject_id == sid)).scalar_one()
    return n, f


def features_of(svc, sid: int, events: list[EventRow]) -> str:
    """The feature digest a forecast from exactly these events has."""
    arrays = event_arrays([(sid, e.time, e.code, e.numeric_value, e.text_value)
                           for e in events])
    return forecast_batch(svc.models.current(), arrays, [sid], [None])[0].feature_digest


def digest(svc, forecast_id: str) -> str:
    with svc.store.read() as s:
        return svc.store.twins.forecast_by_id(s, forecast_id).feature_digest


def replays(svc, sid: int) -> None:
    """Every stored forecast of the twin replays bit for bit from its history as of its
    watermark (what the audit does)."""
    model = svc.models.current()
    with svc.store.read() as s:
        rows = s.execute(select(Forecast).where(Forecast.subject_id == sid)).scalars().all()
        for f in rows:
            h = svc.store.twins.histories(s, [sid], recorded_upto=f.watermark)
            again = forecast_batch(model, h.arrays, [sid], [f.as_of])[0]
            assert (again.risks, again.feature_digest) == (f.risks, f.feature_digest)


def test_a_corrected_value_replaces_the_stored_one(database, tracker, trained, small_cohort):
    svc = service(database, tracker)
    sid = 5_300_001
    events, t = base(svc, small_cohort, trained, sid, 0)
    first = write(svc, sid, [obs(EGFR, 20.0, t)])
    assert (first.added, first.duplicates, first.superseded) == (1, 0, 0)
    count = stored(svc, sid)[0]
    fixed = write(svc, sid, [obs(EGFR, 35.0, t)])
    assert (fixed.added, fixed.duplicates, fixed.superseded) == (1, 0, 1)
    assert stored(svc, sid)[0] == count == json.loads(fixed.view)["event_count"]
    assert latest(svc, sid)["LAB//EGFR"] == 35.0
    assert {v["code"]: v["numeric_value"] for v in json.loads(fixed.view)["latest_values"]
            }["LAB//EGFR"] == 35.0
    # the forecast's features are those of the corrected history, not the original's
    corrected = features_of(svc, sid, [*events, obs(EGFR, 35.0, t)])
    assert digest(svc, fixed.forecast["forecast_id"]) == corrected
    assert corrected != features_of(svc, sid, [*events, obs(EGFR, 20.0, t)])
    # the old row stays, superseded
    with svc.store.read() as s:
        rows = s.execute(select(Event.numeric_value, Event.superseded_at, Event.logical_id)
                         .where(Event.subject_id == sid, Event.logical_id.is_not(None))
                         .order_by(Event.id)).all()
    assert [(r[0], r[1] is not None, r[2]) for r in rows] == [(20.0, True, EGFR),
                                                              (35.0, False, EGFR)]
    svc.store.dispose()


def test_re_sending_either_version_after_a_correction_changes_nothing(
        database, tracker, trained, small_cohort):
    svc = service(database, tracker)
    sid = 5_300_002
    _, t = base(svc, small_cohort, trained, sid, 1)
    write(svc, sid, [obs(EGFR, 20.0, t)])
    fixed = write(svc, sid, [obs(EGFR, 35.0, t)])
    before = stored(svc, sid)
    for version in (35.0, 20.0):  # the corrected one, then the original: both re-sends
        again = write(svc, sid, [obs(EGFR, version, t)])
        assert (again.added, again.duplicates, again.superseded) == (0, 1, 0)
        assert again.forecast["forecast_id"] == fixed.forecast["forecast_id"]
        assert stored(svc, sid) == before
        assert latest(svc, sid)["LAB//EGFR"] == 35.0
    svc.store.dispose()


def test_a_retraction_takes_the_value_back_for_good(database, tracker, trained, small_cohort):
    svc = service(database, tracker)
    sid = 5_300_003
    events, t = base(svc, small_cohort, trained, sid, 2)
    before = latest(svc, sid)["LAB//EGFR"]
    write(svc, sid, [obs(EGFR, 20.0, t)])
    # another resource recorded after it: the retraction's forecast must replay although
    # no live row is recorded at the retraction's time
    write(svc, sid, [obs("Observation/sbp-9", 140.0, t + timedelta(days=1), "VITAL//SBP")])
    count = stored(svc, sid)[0]
    gone = write(svc, sid, [retract(EGFR)])
    assert (gone.added, gone.duplicates, gone.superseded) == (0, 0, 1)
    assert stored(svc, sid)[0] == count - 1 == json.loads(gone.view)["event_count"]
    assert latest(svc, sid)["LAB//EGFR"] == before and at_time(svc, sid, t) == []
    assert digest(svc, gone.forecast["forecast_id"]) == features_of(
        svc, sid, [*events, obs("Observation/sbp-9", 140.0, t + timedelta(days=1),
                                "VITAL//SBP")])
    after = stored(svc, sid)
    for again in ([obs(EGFR, 20.0, t)], [retract(EGFR)]):  # neither brings it back
        out = write(svc, sid, again)
        # a retraction is not an event: one that finds nothing live counts as nothing
        assert (out.added, out.duplicates, out.superseded) == (
            0, 0 if again[0].retract else 1, 0)
        assert out.forecast["forecast_id"] == gone.forecast["forecast_id"]
        assert stored(svc, sid) == after and at_time(svc, sid, t) == []
    replays(svc, sid)
    svc.store.dispose()


def test_a_panel_version_supersedes_the_components_it_drops(database, tracker, trained,
                                                            small_cohort):
    svc = service(database, tracker)
    sid = 5_300_004
    _, t = base(svc, small_cohort, trained, sid, 3)

    def panel(*parts):
        return write(svc, sid, [obs(lid, v, t, code) for lid, v, code in parts])

    one = panel((SBP, 150.0, "VITAL//SBP"), (DBP, 90.0, "VITAL//DBP"))
    assert (one.added, one.superseded) == (2, 0)
    count = stored(svc, sid)[0]
    two = panel((SBP, 155.0, "VITAL//SBP"))  # corrected, and the diastolic dropped
    assert (two.added, two.duplicates, two.superseded) == (1, 0, 2)
    assert at_time(svc, sid, t) == [("VITAL//SBP", 155.0)]
    assert stored(svc, sid)[0] == count - 1
    # a version bringing back a superseded component gets a fresh row for it
    three = panel((SBP, 150.0, "VITAL//SBP"), (DBP, 80.0, "VITAL//DBP"))
    assert (three.added, three.duplicates, three.superseded) == (2, 0, 1)
    assert at_time(svc, sid, t) == [("VITAL//DBP", 80.0), ("VITAL//SBP", 150.0)]
    with svc.store.read() as s:
        keys = s.execute(select(Event.idempotency_key).where(
            Event.subject_id == sid, Event.logical_id == SBP)).scalars().all()
    assert len(keys) == len(set(keys)) == 3 and sum("~" in k for k in keys) == 1
    assert all(len(k) <= 128 for k in keys)
    # versions seen before — whole, or a part of one — are re-sends
    for parts in ([(SBP, 150.0, "VITAL//SBP"), (DBP, 90.0, "VITAL//DBP")],
                  [(DBP, 80.0, "VITAL//DBP")]):
        out = panel(*parts)
        assert (out.added, out.duplicates, out.superseded) == (0, len(parts), 0)
    assert at_time(svc, sid, t) == [("VITAL//DBP", 80.0), ("VITAL//SBP", 150.0)]
    replays(svc, sid)
    svc.store.dispose()


def test_a_forecast_made_before_a_correction_still_replays(database, tracker, trained,
                                                           small_cohort):
    svc = service(database, tracker)
    sid = 5_300_005
    _, t = base(svc, small_cohort, trained, sid, 4)
    first = write(svc, sid, [obs(EGFR, 20.0, t)])
    write(svc, sid, [obs(EGFR, 35.0, t)])
    with svc.store.read() as s:
        then = svc.store.twins.forecast_by_id(s, first.forecast["forecast_id"]).watermark
    assert at_time(svc, sid, t, recorded_upto=then) == [("LAB//EGFR", 20.0)]
    assert at_time(svc, sid, t) == [("LAB//EGFR", 35.0)]
    replays(svc, sid)
    svc.store.dispose()


def test_rows_stored_before_logical_ids_compare_by_content(database, tracker, trained,
                                                           small_cohort):
    """A FHIR event stored by the earlier code (key ``id:<resource>``), migrated."""
    sid = 5_300_006
    db = Database(database)
    cfg = _alembic_config(db.engine)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0007")
    events = event_rows(history(small_cohort, trained, 5))
    t = max(e.time for e in events if e.time is not None) + timedelta(days=30)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO twins (subject_id, created_at, updated_at, "
                          "event_count) VALUES (:sid, :t, :t, 1)"), {"sid": sid, "t": t})
        conn.execute(Event.__table__.insert().values(
            subject_id=sid, time=t, code="LAB//EGFR", numeric_value=20.0, recorded_at=t,
            idempotency_key="id:Observation/x", source="fhir:Observation/x"))
    db.dispose()
    svc = service(database, tracker)  # migrates to the head
    with svc.store.read() as s:
        assert s.execute(select(Event.logical_id).where(Event.subject_id == sid)
                         ).scalar_one() == "Observation/x"
    write(svc, sid, events)  # plain events: a forecast and a view
    before = stored(svc, sid)
    same = write(svc, sid, [obs("Observation/x", 20.0, t)])
    assert (same.added, same.duplicates, same.superseded) == (0, 1, 0)
    assert stored(svc, sid) == before
    fixed = write(svc, sid, [obs("Observation/x", 35.0, t)])
    assert (fixed.added, fixed.duplicates, fixed.superseded) == (1, 0, 1)
    assert at_time(svc, sid, t) == [("LAB//EGFR", 35.0)]
    svc.store.dispose()


def test_a_refresh_overtaken_by_a_correction_writes_nothing(database, tracker, trained,
                                                            small_cohort):
    """A correction keeps the event count: the refresh sees it by the forecast head."""
    svc = service(database, tracker)
    sid = 5_300_007
    _, t = base(svc, small_cohort, trained, sid, 6)
    write(svc, sid, [obs(EGFR, 20.0, t)])
    read = svc.store.twins.histories

    def read_then_correct(s, ids, *args, **kwargs):
        got = read(s, ids, *args, **kwargs)
        svc.store.twins.histories = read
        write(svc, sid, [obs(EGFR, 35.0, t)])  # lands between the read and the write
        return got

    svc.store.twins.histories = read_then_correct
    assert svc.writer.refresh([sid], svc.models.current()) == 0
    with svc.store.read() as s:
        view = json.loads(s.execute(select(Twin.view).where(Twin.subject_id == sid))
                          .scalar_one())
    assert {v["code"]: v["numeric_value"] for v in view["latest_values"]}["LAB//EGFR"] == 35.0
    svc.store.dispose()
