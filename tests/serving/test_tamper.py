"""Tamper evidence against someone with database rights, on SQLite and PostgreSQL: each
twin's forecasts are a chain, anchors outside the database hold the chain heads and the
access log, and every kind of rewrite is detected by the chain or by the anchors."""

from __future__ import annotations

import json
import shutil

from sqlalchemy import select, text

from serving.store.models import Forecast
from serving.store.twins import DIGEST_VERSION, forecast_digest
from serving.tamper import anchor, forecast_dict, verify_anchors, verify_chains
from serving.writes import AccessInfo, Caller, TwinInput
from tests.serving.conftest import event_rows
from tests.serving.test_service import history
from tests.serving.test_writes import service
from training.tracking import Tracker

TRIGGERS = {"sqlite": ["DROP TRIGGER forecasts_no_update", "DROP TRIGGER forecasts_no_delete",
                       "DROP TRIGGER access_log_no_delete"],
            "postgresql": ["DROP TRIGGER forecasts_append_only ON forecasts",
                           "DROP TRIGGER access_log_append_only ON access_log"]}


def rewrite(store, seq: int, **values) -> dict:
    """What an attacker does: change a row, then give it a digest that matches."""
    with store.read() as s:
        row = forecast_dict(s.execute(select(Forecast).where(Forecast.seq == seq)).scalar_one())
    row.update(values)
    sets = ", ".join(f"{k} = :{k}" for k in values)
    with store.write() as s:
        s.execute(text(f"UPDATE forecasts SET {sets}, row_digest = :d WHERE seq = :seq"),
                  {**{k: json.dumps(v) if isinstance(v, dict) else v
                      for k, v in values.items()}, "d": forecast_digest(row), "seq": seq})
    return {**row, "row_digest": forecast_digest(row)}


def test_every_rewrite_is_caught_by_the_chain_or_the_anchors(database, tracker, trained,
                                                             small_cohort, tmp_path):
    shutil.copy(tracker.tracking_uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    copy = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tracker.artifact_root)
    svc = service(database, copy)
    store, caller = svc.store, Caller("ward")
    sids = [8_100_001, 8_100_002]
    for sid in sids:
        events = event_rows(history(small_cohort, trained, sid % 7))
        for part in (events[:-2], events[-2:-1], events[-1:]):  # three forecasts each
            svc.writer.write([TwinInput(sid, events=part)], caller,
                             AccessInfo("POST", f"/v1/twins/{sid}/events", "ingest_events"))
    with store.read() as s:
        rows = s.execute(select(Forecast.seq, Forecast.subject_id, Forecast.prev_digest,
                                Forecast.row_digest, Forecast.digest_version)
                         .order_by(Forecast.seq)).all()
    chain = [r for r in rows if r.subject_id == sids[0]]
    assert len(chain) == 3 and all(r.digest_version == DIGEST_VERSION for r in rows)
    assert chain[0].prev_digest is None and chain[1].prev_digest == chain[0].row_digest
    assert verify_chains(store) == (len(rows), [])
    first = anchor(store, copy, by="test", settle_seconds=0)
    assert int(first["twins"]) == 2 and int(first["access_rows"]) == 6
    assert [a["ok"] for a in verify_anchors(store, copy)] == [True]

    with store.write() as s:  # the attacker holds database rights
        for stmt in TRIGGERS["sqlite" if store.sqlite else "postgresql"]:
            s.execute(text(stmt))
    # 1. a middle row altered and re-digested: the next row no longer follows it
    rewrite(store, chain[1].seq, risks={"365d": 0.001, "730d": 0.002})
    _, breaks = verify_chains(store)
    assert [(b.subject_id, "does not follow" in b.reason) for b in breaks] == [(sids[0], True)]
    # 2. ... and the rest of the chain and the head rewritten too: the chain holds again,
    # the anchor does not
    fixed = rewrite(store, chain[2].seq, prev_digest=digest_at(store, chain[1].seq))
    with store.write() as s:
        s.execute(text("UPDATE twins SET forecast_head = :h WHERE subject_id = :s"),
                  {"h": fixed["row_digest"], "s": sids[0]})
    assert verify_chains(store)[1] == []
    (checked,) = verify_anchors(store, copy)
    assert not checked["ok"] and "forecast chain heads differ" in checked["problems"][0]
    # 3. an anchored access-log row deleted
    with store.write() as s:
        s.execute(text("DELETE FROM access_log WHERE id = (SELECT min(id) FROM access_log)"))
    (checked,) = verify_anchors(store, copy)
    assert any("access-log rows differ" in p for p in checked["problems"])
    # 4. the latest row of the other twin deleted: its head no longer matches
    other = [r for r in rows if r.subject_id == sids[1]]
    with store.write() as s:
        s.execute(text("DELETE FROM forecasts WHERE seq = :q"), {"q": other[-1].seq})
    assert any(b.subject_id == sids[1] and "head" in b.reason for b in verify_chains(store)[1])
    store.dispose()


def test_a_trajectory_altered_is_caught(database, tracker, trained, small_cohort):
    """From digest version 3 a row's digest covers its trajectories: a forecast eGFR
    changed in the database no longer matches."""
    svc, sid = one_forecast(database, tracker, trained, small_cohort, 8_300_001, 2)
    store = svc.store
    with store.read() as s:
        row = s.execute(select(Forecast).where(Forecast.subject_id == sid)).scalar_one()
        seq, paths = row.seq, row.trajectories
    assert paths and paths[0]["code"] == "LAB//EGFR"
    assert verify_chains(store)[1] == []
    with store.write() as s:
        for stmt in TRIGGERS["sqlite" if store.sqlite else "postgresql"]:
            s.execute(text(stmt))
        paths[0]["median"] += 10
        s.execute(text("UPDATE forecasts SET trajectories = :t WHERE seq = :q"),
                  {"t": json.dumps(paths), "q": seq})
    breaks = verify_chains(store)[1]
    assert [(b.subject_id, "altered" in b.reason) for b in breaks] == [(sid, True)]
    store.dispose()


def one_forecast(database, tracker, trained, small_cohort, sid: int, k: int):
    """A service on ``database`` and one twin written with a held-out history."""
    svc = service(database, tracker)
    svc.writer.write([TwinInput(sid, events=event_rows(history(small_cohort, trained, k)))],
                     Caller("ward"), None)
    return svc, sid


def digest_at(store, seq: int) -> str:
    with store.read() as s:
        return s.execute(select(Forecast.row_digest).where(Forecast.seq == seq)).scalar_one()


def test_rows_from_before_the_chains_still_verify(database, tracker, trained,
                                                  small_cohort):
    svc, sid = one_forecast(database, tracker, trained, small_cohort, 8_200_001, 3)
    store = svc.store
    with store.read() as s:
        row = forecast_dict(s.execute(select(Forecast).where(Forecast.subject_id == sid))
                            .scalar_one())
    # a version-1 row as the earlier code wrote it: its digest covers the row alone
    old = {**row, "forecast_id": "00000000-0000-4000-8000-000000000001",
           "subject_id": 8_200_002, "digest_version": 1, "prev_digest": None,
           "trajectories": None}  # rows of that time stored none
    old["row_digest"] = forecast_digest({k: v for k, v in old.items()
                                         if k not in ("digest_version", "prev_digest")})
    with store.write() as s:
        s.execute(text("INSERT INTO twins (subject_id, created_at, updated_at, event_count) "
                       "VALUES (8200002, :t, :t, 0)"), {"t": row["created_at"]})
        s.execute(Forecast.__table__.insert(), [old])
        # what migration 0007 does: the chain starts after the twin's latest old row
        s.execute(text("UPDATE twins SET forecast_head = (SELECT f.row_digest FROM "
                       "forecasts f WHERE f.subject_id = twins.subject_id ORDER BY f.seq "
                       "DESC LIMIT 1) WHERE subject_id = 8200002"))
    checked, breaks = verify_chains(store)
    assert checked == 2 and breaks == []
    # that twin written again: its first version-2 row follows the old row
    svc.writer.write([TwinInput(8_200_002, events=event_rows(history(small_cohort, trained,
                                                                     4)))], Caller("ward"),
                     None)
    with store.read() as s:
        newest = s.execute(select(Forecast).where(Forecast.subject_id == 8_200_002)
                           .order_by(Forecast.seq.desc()).limit(1)).scalar_one()
    assert newest.digest_version == DIGEST_VERSION
    assert newest.prev_digest == old["row_digest"]
    checked, breaks = verify_chains(store)
    assert checked == 3 and breaks == []
    store.dispose()
