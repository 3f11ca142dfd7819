"""Twin alerts against real databases: thresholds from the task file, one open alert per
twin and horizon, hysteresis, expired forecasts, the refresh's crossings queued for
review, append-only rows — and, on PostgreSQL, concurrent writers that never open two."""

from __future__ import annotations

import contextlib
import itertools
import threading
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from features.task import parse_task
from serving.errors import Conflict
from serving.store import open_store
from serving.store.risks import levels
from serving.writes import AccessInfo, Caller, TwinInput
from tests.serving.conftest import event_rows
from tests.serving.test_service import history
from tests.serving.test_writes import service

NOW = datetime(2026, 6, 1)  # noqa: DTZ001 - naive UTC, as the store's times
TASK = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [365, 730],
                   "alerts": {"hysteresis": 0.05, "thresholds": [
                       {"horizon_days": 730, "threshold": 0.3, "warning": 0.1}]}})
POLICY = levels(TASK)


def forecast(sid: int, risk730: float | None, as_of: datetime = NOW - timedelta(days=10)):
    return {"subject_id": sid, "forecast_id": str(uuid.uuid4()), "as_of": as_of,
            "status": "ok" if risk730 is not None else "not_eligible",
            "risks": None if risk730 is None else {"365d": risk730 / 2, "730d": risk730}}


def apply(store, rows, *, refresh=False, now=NOW, version="1", explicit=frozenset()):
    def work(s):
        store.twins.lock(s, [r["subject_id"] for r in rows], create=True, now=now)
        return store.risks.apply(s, rows, "twincast-t", version, POLICY, now, refresh=refresh,
                                 explicit=explicit)
    return store.db.transact(work)


def ack(store, alert_id, reason="seen"):
    return store.db.transact(lambda s: store.risks.acknowledge(s, alert_id, None, "nurse",
                                                               reason, NOW))


def open_alerts(store, sid=None, kind="alert"):
    with store.read() as s:
        return store.risks.alerts(s, NOW, kind=kind, subject_id=sid)[0]


def test_task_thresholds_validate_and_stay_out_of_the_digest():
    assert POLICY[730].threshold == 0.3 and POLICY[730].rearm == pytest.approx(0.25)
    assert 365 not in POLICY  # only the horizons the task names alert
    plain = parse_task({"name": "t", "outcome": {"codes": ["DX//ESKD"]},
                        "horizons_days": [365, 730]})
    assert plain.digest() == TASK.digest()  # a policy: changing it needs no retraining
    assert {h: lv.threshold for h, lv in levels(plain).items()} == {365: 0.3, 730: 0.3}
    with pytest.raises(ValueError, match="horizon 90 is not one of"):
        parse_task({"name": "t", "outcome": {"codes": ["X"]}, "horizons_days": [365],
                    "alerts": {"thresholds": [{"horizon_days": 90, "threshold": 0.2}]}})
    with pytest.raises(ValueError, match=r"warning 0\.4 must be below threshold"):
        parse_task({"name": "t", "outcome": {"codes": ["X"]}, "horizons_days": [365],
                    "alerts": {"thresholds": [{"horizon_days": 365, "threshold": 0.2,
                                               "warning": 0.4}]}})


def test_one_open_alert_per_twin_and_horizon_with_hysteresis(store):
    sid = 11
    assert apply(store, [forecast(sid, 0.10)]) == []
    first = forecast(sid, 0.35)
    opened = apply(store, [first])
    assert [(a["horizon_days"], a["kind"], a["forecast_id"]) for a in opened] == [
        (730, "alert", first["forecast_id"])]
    assert opened[0]["previous_risk"] == pytest.approx(0.10)
    assert apply(store, [forecast(sid, 0.40)]) == []  # still above: the same alert stands
    [row] = open_alerts(store, sid)
    ack(store, row["id"], "seen; referral booked")
    assert open_alerts(store, sid) == []
    assert apply(store, [forecast(sid, 0.45)]) == []  # acknowledged, still disarmed
    assert apply(store, [forecast(sid, 0.27)]) == []  # below 0.30, not below 0.25: disarmed
    assert apply(store, [forecast(sid, 0.31)]) == []
    assert apply(store, [forecast(sid, 0.20)]) == []  # below the re-arm level
    again = apply(store, [forecast(sid, 0.33)])
    assert len(again) == 1 and again[0]["kind"] == "alert"
    # an unacknowledged alert blocks a second one even after a re-arm
    apply(store, [forecast(sid, 0.1)])
    assert apply(store, [forecast(sid, 0.5)]) == []
    assert len(open_alerts(store, sid)) == 1
    with pytest.raises(Conflict, match="acknowledged already"):
        ack(store, row["id"])
    with store.read() as s:
        acked = store.risks.alerts(s, NOW, state="acknowledged", subject_id=sid)[0]
    assert [(a["acknowledged_by"], a["reason"]) for a in acked] == [
        ("nurse", "seen; referral booked")]


def test_expired_forecasts_raise_nothing_and_are_never_ranked(store):
    old = NOW - timedelta(days=800)  # the 730-day window ended 70 days ago
    apply(store, [forecast(21, 0.05), forecast(22, 0.9, as_of=old), forecast(23, 0.5)])
    assert [a["subject_id"] for a in open_alerts(store)] == [23]
    with store.read() as s:
        ranked, total = store.risks.population(s, 730, NOW)
        gone, n_gone = store.risks.population(s, 730, NOW, expired=True)
        high, _ = store.risks.population(s, 730, NOW, min_risk=0.3)
        alerted, _ = store.risks.population(s, 730, NOW, open_alert=True)
    assert [r["subject_id"] for r in ranked] == [23, 21] and total == 2
    assert [r["subject_id"] for r in gone] == [22] and gone[0]["expired"] and n_gone == 1
    assert [r["subject_id"] for r in high] == [23]
    assert [r["subject_id"] for r in alerted] == [23]
    # an open alert whose forecast has since expired is no longer open
    later = NOW + timedelta(days=800)
    with store.read() as s:
        assert store.risks.alerts(s, later)[0] == []
        assert store.risks.population(s, 730, later, open_alert=True)[1] == 0


def test_rise_is_within_one_model_version(store):
    apply(store, [forecast(31, 0.10), forecast(32, 0.20), forecast(33, 0.05)])
    apply(store, [forecast(31, 0.12), forecast(32, 0.28), forecast(33, 0.02)])
    with store.read() as s:
        rows, _ = store.risks.population(s, 730, NOW, sort="rise")
    assert [r["subject_id"] for r in rows] == [32, 31, 33]
    assert rows[0]["rise"] == pytest.approx(0.08)
    apply(store, [forecast(31, 0.5)], refresh=True, version="2")  # the model moved it
    with store.read() as s:
        rows, _ = store.risks.population(s, 730, NOW, sort="rise")
    assert [r["subject_id"] for r in rows] == [32, 33]  # not a rise of the patient's


def test_the_refresh_queues_model_made_crossings_for_review(store):
    apply(store, [forecast(34, 0.10), forecast(35, 0.20), forecast(36, 0.10)])
    apply(store, [forecast(34, 0.12), forecast(35, 0.35), forecast(36, 0.40)], refresh=True,
          version="2")  # a new model version's refresh
    assert open_alerts(store) == []  # nobody paged
    queued = open_alerts(store, kind="review")
    assert {(a["subject_id"], a["model_version"], a["previous_model_version"])
            for a in queued} == {(35, "2", "1"), (36, "2", "1")}
    # not reviewed: the twin's own next forecast above the line alerts
    [own] = apply(store, [forecast(35, 0.36)], version="2")
    assert own["kind"] == "alert"
    # reviewed: the reviewer has seen it, the slot is disarmed while it stays above
    ack(store, next(a["id"] for a in queued if a["subject_id"] == 36), "model change: ok")
    assert apply(store, [forecast(36, 0.41)], version="2") == []
    assert apply(store, [forecast(36, 0.10)], version="2") == []  # re-armed below 0.25
    assert len(apply(store, [forecast(36, 0.31)], version="2")) == 1


def test_a_first_forecast_by_the_refresh_alerts(store):
    """Twins imported without forecasts are first forecast by the refresh: no previous
    version to blame, so a risk above the line is an alert like any first forecast."""
    [a] = apply(store, [forecast(37, 0.6)], refresh=True)
    assert a["kind"] == "alert" and a["previous_model_version"] is None


def test_a_lapsed_alert_and_a_return_after_an_expired_forecast_re_arm(store):
    apply(store, [forecast(38, 0.1)])
    [first] = apply(store, [forecast(38, 0.6)])  # never acknowledged
    later = NOW + timedelta(days=800)  # its window (730 days from as-of) has ended
    [again] = apply(store, [forecast(38, 0.7, as_of=later - timedelta(days=5))], now=later)
    assert again["id"] != first["id"]
    with store.read() as s:
        open_now, _ = store.risks.alerts(s, later, subject_id=38)
    assert [a["id"] for a in open_now] == [again["id"]]


def test_a_forecast_asked_at_an_earlier_time_changes_nothing(store):
    apply(store, [forecast(39, 0.1)])
    stale = forecast(39, 0.9, as_of=NOW - timedelta(days=300))
    assert apply(store, [stale], explicit={39}) == []
    with store.read() as s:
        [row] = [r for r in store.risks.current(s, 39, NOW) if r["horizon_days"] == 730]
    assert row["risk"] == pytest.approx(0.1) and row["forecast_id"] != stale["forecast_id"]
    # the twin's own forecast at its latest event, earlier now (that event was retracted),
    # is the current risk all the same
    back = forecast(39, 0.2, as_of=NOW - timedelta(days=40))
    apply(store, [back])
    with store.read() as s:
        [row] = [r for r in store.risks.current(s, 39, NOW) if r["horizon_days"] == 730]
    assert row["forecast_id"] == back["forecast_id"]


def test_a_new_versions_new_horizon_is_a_review(store):
    only_1y = {**forecast(40, None), "status": "ok", "risks": {"365d": 0.05}}
    apply(store, [only_1y])  # version 1 forecast one year only
    [queued] = apply(store, [forecast(40, 0.6)], refresh=True, version="2")
    assert (queued["kind"], queued["horizon_days"]) == ("review", 730)


def test_alert_rows_are_append_only(store):
    apply(store, [forecast(41, 0.1)])
    [a] = apply(store, [forecast(41, 0.6)])
    ack(store, a["id"])
    for sql in ("UPDATE twin_alerts SET risk = 0", "DELETE FROM twin_alerts",
                "UPDATE alert_acks SET reason = 'x'", "DELETE FROM alert_acks"):
        with pytest.raises(Exception, match="append-only"), store.write() as s:
            s.execute(text(sql))


def test_a_rising_twin_opens_an_alert_through_the_write_path(database, tracker, trained,
                                                            small_cohort):
    """The served model's own forecasts: a falling eGFR crosses the task's threshold
    (the tiny task's thresholds come from examples/tasks/eskd.yaml)."""
    svc = service(database, tracker)
    try:
        model = svc.models.current()
        level = levels(model.bundle.task)[730]
        sid, events = _low_risk_twin(svc, small_cohort, trained, level.threshold)
        last = max(e.time for e in events if e.time is not None)
        drops = [type(events[0])(last + timedelta(days=30 * k), "LAB//EGFR", v, None)
                 for k, v in enumerate((9.0, 7.0, 6.0), start=1)]
        out = svc.writer.write([TwinInput(sid, events=drops)], Caller("ward"),
                               AccessInfo("POST", f"/v1/twins/{sid}/events", "ingest_events"))
        risk = out[0].forecast["risks"]["730d"]
        now = svc.writer.clock()
        with svc.store.read() as s:
            alerts, _ = svc.store.risks.alerts(s, now, subject_id=sid)
            current = svc.store.risks.current(s, sid, now)
        if risk < level.threshold or current[-1]["expired"]:
            pytest.fail(f"the falling eGFR gave {risk:.3f} (threshold {level.threshold})")
        at730 = [a for a in alerts if a["horizon_days"] == 730]
        assert [a["forecast_id"] for a in at730] == [out[0].forecast["forecast_id"]]
        assert current[-1]["open_alert_id"] == at730[0]["id"]
    finally:
        svc.store.dispose()


def _low_risk_twin(svc, small_cohort, trained, threshold):
    """A held-out history moved to end 60 days ago (so its forecast is current), whose
    forecast is below ``threshold``."""
    import pandas as pd

    for k in range(40):
        frame = history(small_cohort, trained, k).copy()
        shift = pd.Timestamp(svc.writer.clock()) - pd.Timedelta(days=60) - frame["time"].max()
        frame["time"] = frame["time"] + shift
        events = event_rows(frame)
        sid = 7_000_000 + k + uuid.uuid4().int % 1_000_000 * 100
        out = svc.writer.write([TwinInput(sid, events=events)], Caller("ward"), None)
        fc = out[0].forecast
        if fc["status"] == "ok" and fc["risks"]["730d"] < threshold * 0.5:
            return sid, events
    raise AssertionError("no held-out history with a low forecast")


def test_concurrent_writers_on_postgresql_open_one_alert(pg_database, tracker, trained,
                                                         small_cohort):
    """Two workers (two services on one PostgreSQL database), eight threads, the same
    twin's crossing sent by all of them at once: one alert, never two."""
    a, b = service(pg_database, tracker), service(pg_database, tracker)
    try:
        level = levels(a.models.current().bundle.task)[730]
        sid, events = _low_risk_twin(a, small_cohort, trained, level.threshold)
        last = max(e.time for e in events if e.time is not None)
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def send(k: int) -> None:
            svc = (a, b)[k % 2]
            try:
                start.wait()
                drop = [type(events[0])(last + timedelta(days=20 + k), "LAB//EGFR",
                                        6.0 + k * 0.1, None)]
                svc.writer.write([TwinInput(sid, events=drop)], Caller(f"w{k}"), None)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        now = a.writer.clock()
        with a.store.read() as s:
            alerts, _ = a.store.risks.alerts(s, now, state="all", subject_id=sid)
            current = a.store.risks.current(s, sid, now)
            fc = a.store.twins.forecasts(s, sid, 1, 0)[0][0]
        assert fc.risks["730d"] >= level.threshold, fc.risks
        assert len([x for x in alerts if x["horizon_days"] == 730]) == 1
        assert current[-1]["forecast_id"] == fc.forecast_id  # the projection is the latest
    finally:
        a.store.dispose()
        b.store.dispose()


def test_acknowledgements_racing_writers_on_postgresql_keep_one_open_alert(pg_database):
    """Two stores (two workers) on one PostgreSQL database: writers pushing a twin over
    and under the line while another acknowledges whatever is open.  At every end there
    is at most one unacknowledged alert per twin and horizon, and the slot names it."""
    import random

    stores = [open_store(pg_database), open_store(pg_database)]
    sid = 61
    apply(stores[0], [forecast(sid, 0.1)])
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    ticks = itertools.count(1)  # later and later as-of times (some land out of order)

    def writer(k: int) -> None:
        rnd = random.Random(k)
        try:
            start.wait()
            for _ in range(25):
                as_of = NOW - timedelta(days=9) + timedelta(seconds=next(ticks))
                apply(stores[k % 2], [forecast(sid, rnd.choice((0.1, 0.5)), as_of=as_of)])
        except BaseException as exc:
            errors.append(exc)

    def acknowledger() -> None:
        try:
            start.wait()
            for _ in range(40):
                for a in open_alerts(stores[1], sid):
                    with contextlib.suppress(Conflict):  # the other worker was first
                        ack(stores[1], a["id"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=acknowledger))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        with stores[0].read() as s:
            all_alerts, _ = stores[0].risks.alerts(s, NOW, state="all", subject_id=sid)
            [slot] = [r for r in stores[0].risks.current(s, sid, NOW) if r["horizon_days"] == 730]
        unacked = [a for a in all_alerts if not a["acknowledged_at"]]
        assert len(all_alerts) >= 2  # the race did open and acknowledge alerts
        assert len(unacked) <= 1
        assert slot["open_alert_id"] == (unacked[0]["id"] if unacked else None)
    finally:
        for st in stores:
            st.dispose()


def test_the_migration_fills_each_twins_current_risks(database, tracker, trained,
                                                      small_cohort):
    """A store written before the pages existed (0010), upgraded: every twin's current
    forecast is in ``twin_risks`` at once, armed, with no alert raised."""
    from alembic import command

    from serving.store.db import Database, _alembic_config

    db = Database(database)
    cfg = _alembic_config(db.engine)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0010")
    with db.engine.begin() as conn:  # a twin as 0010 kept it: its view with a forecast
        view = ('{"subject_id": 81, "forecast": {"forecast_id": "f81", "status": "ok", '
                '"as_of": "2026-05-01T00:00:00Z", "risks": {"365d": 0.1, "730d": 0.4}, '
                '"model": {"name": "twincast-eskd", "version": "3"}}}')
        conn.execute(text("INSERT INTO twins (subject_id, created_at, updated_at, "
                          "event_count, view, last_event_time) VALUES (81, :t, :t, 1, :v, :t)"),
                     {"t": datetime(2026, 5, 1), "v": view})  # noqa: DTZ001
    db.dispose()
    st = open_store(database)  # migrates to the head
    try:
        with st.read() as s:
            rows = st.risks.current(s, 81, NOW)
            ranked, _ = st.risks.population(s, 730, NOW)
        assert [(r["horizon_days"], r["risk"], r["forecast_id"]) for r in rows] == [
            (365, 0.1, "f81"), (730, 0.4, "f81")]
        assert [r["subject_id"] for r in ranked] == [81]
        assert open_alerts(st) == []
    finally:
        st.dispose()
