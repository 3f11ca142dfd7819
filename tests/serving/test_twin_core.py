"""The twin core against real servers with two workers, on SQLite and on PostgreSQL:
patients never merge, identifiers resolve under concurrency, a refresh survives a killed
worker and a roll-back, and every entry point forecasts what the model package would."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import os
import signal
import time
import uuid

import httpx
import jwt
import mlflow
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from features.events import shortest_f32
from features.fhir import bundle_to_events, import_to_frame
from serving.store import open_store
from serving.store.ids import ASSIGNED_MIN
from serving.store.models import Event, Forecast, Identifier, Twin
from tests.serving.conftest import CDS_ISSUER, start_server
from tests.serving.test_service import api_events, history, promote_copy
from training.package import PREDICT_CODE, trajectory_output
from training.registry import model_name
from training.tracking import Tracker

BASE = pd.Timestamp("2021-01-04T09:00:00")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def core_server(request, trained, mlflow_home, tmp_path_factory):
    """Two workers, a 3 s refresh lease, a slow refresh (so a kill lands in it)."""
    db = (None if request.param == "sqlite"
          else request.getfixturevalue("pg_database_module"))
    with start_server(request.param, tmp_path_factory, mlflow_home, db_url=db,
                      extra_keys={"clinical-2": "clinical"},
                      env={"TWINCAST_WORKERS": "2", "TWINCAST_REFRESH_LEASE_SECONDS": "3",
                           "TWINCAST_REFRESH_CHUNK": "40", "TWINCAST_MODEL_POLL_SECONDS": "0.5",
                           "TWINCAST_FAILPOINTS": "slow_refresh"}) as server:
        yield server


def observation(pid: str, k: int, egfr: float, day: int) -> dict:
    return {"resourceType": "Observation", "id": f"{pid}-egfr-{k}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "62238-1"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": (BASE + pd.Timedelta(days=day)).isoformat() + "Z",
            "valueQuantity": {"value": egfr, "unit": "mL/min/{1.73_m2}",
                              "system": "http://unitsofmeasure.org",
                              "code": "mL/min/{1.73_m2}"}}


def patient_bundle(pid: str, identifiers: list[tuple[str, str]], n_obs: int = 4,
                   start: float = 45.0) -> dict:
    """A patient with a birth date and ``n_obs`` eGFR values, falling from ``start``."""
    patient = {"resourceType": "Patient", "id": pid, "gender": "female",
               "birthDate": "1961-03-02",
               "identifier": [{"system": s, "value": v} if s else {"value": v}
                              for s, v in identifiers]}
    entries = [{"resource": patient}] + [
        {"resource": observation(pid, k, start - 2.5 * k, 90 * k)} for k in range(n_obs)]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def twin_state(server, sid: int) -> dict:
    with server.client("auditor") as c:
        r = c.get(f"/v1/twins/{sid}")
        assert r.status_code == 200, r.text
        return r.json()


def db_counts(server) -> dict[str, int]:
    store = open_store(server.db_url, migrate=False)
    try:
        with store.read() as s:
            return {t.__tablename__: s.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in (Twin, Event, Identifier, Forecast)}
    finally:
        store.dispose()


def post_all(server, bodies: list[dict], path: str = "/v1/fhir", role: str = "clinical"
             ) -> list[httpx.Response]:
    def post(body):
        with server.client(role) as c:
            return c.post(path, json=body)

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


# ------------------------------------------------------------------ identity


def test_sixteen_new_patients_at_once_give_sixteen_twins_each_with_its_own_events(core_server):
    tag = uuid.uuid4().hex[:8]
    bodies = [patient_bundle(f"p{k}", [("urn:test:mrn", f"{tag}-{k}")], start=60.0 - k)
              for k in range(16)]
    answers = post_all(core_server, bodies)
    assert [r.status_code for r in answers] == [200] * 16, [r.text for r in answers]
    sids = [r.json()["patients"][0]["subject_id"] for r in answers]
    assert len(set(sids)) == 16
    assert all(ASSIGNED_MIN <= s < 2**53 for s in sids)
    for k, sid in enumerate(sids):
        state = twin_state(core_server, sid)
        egfr = next(v for v in state["latest_values"] if v["code"] == "LAB//EGFR")
        assert state["event_count"] == 2 + 4  # gender, birth, four eGFR values: no one else's
        assert egfr["numeric_value"] == pytest.approx(60.0 - k - 7.5)


def test_the_same_new_patient_sent_eight_times_at_once_is_one_twin(core_server):
    body = patient_bundle("solo", [("urn:test:mrn", uuid.uuid4().hex)])
    answers = post_all(core_server, [body] * 8)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    sids = {r.json()["patients"][0]["subject_id"] for r in answers}
    assert len(sids) == 1
    assert sum(r.json()["patients"][0]["created"] for r in answers) == 1
    assert twin_state(core_server, sids.pop())["event_count"] == 6


def test_two_identifiers_in_opposite_orders_at_once_are_one_twin(core_server):
    a, b = ("urn:test:mrn", uuid.uuid4().hex), ("urn:test:nhs", uuid.uuid4().hex)
    bodies = [patient_bundle("x", [a, b]), patient_bundle("x", [b, a])] * 3
    answers = post_all(core_server, bodies)
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert len({r.json()["patients"][0]["subject_id"] for r in answers}) == 1


def test_patient_one_from_two_senders_is_two_twins(core_server):
    bare = patient_bundle("1", [])  # a logical id only: it means something to its sender
    with core_server.client("clinical") as c1, core_server.client("clinical-2") as c2:
        first = c1.post("/v1/fhir", json=bare).json()["patients"][0]
        second = c2.post("/v1/fhir", json=bare).json()["patients"][0]
        again = c1.post("/v1/fhir", json=bare).json()["patients"][0]
        no_system = patient_bundle("2", [("", "12345")])
        third = c1.post("/v1/fhir", json=no_system).json()["patients"][0]
        fourth = c2.post("/v1/fhir", json=no_system).json()["patients"][0]
    assert first["subject_id"] != second["subject_id"]
    assert again["subject_id"] == first["subject_id"] and again["added"] == 0
    assert third["subject_id"] != fourth["subject_id"]


def test_identifiers_of_two_twins_in_one_patient_are_409_and_write_nothing(core_server):
    a, b = ("urn:test:mrn", uuid.uuid4().hex), ("urn:test:mrn", uuid.uuid4().hex)
    fresh = ("urn:test:other", uuid.uuid4().hex)
    with core_server.client() as c:
        sid_a = c.post("/v1/fhir", json=patient_bundle("a", [a])).json()["patients"][0]
        sid_b = c.post("/v1/fhir", json=patient_bundle("b", [b])).json()["patients"][0]
        before = db_counts(core_server)
        merged = patient_bundle("ab", [a, fresh, b], n_obs=6)
        r = c.post("/v1/fhir", json=merged)
        assert r.status_code == 409, r.text
        assert str(sid_a["subject_id"]) in r.json()["message"]
        assert str(sid_b["subject_id"]) in r.json()["message"]
    assert db_counts(core_server) == before  # no events, no link for the fresh identifier


def test_native_routes_refuse_ids_the_store_assigns(core_server):
    good = {"events": [{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR",
                        "numeric_value": 40.0}]}
    with core_server.client() as c:
        assert c.post(f"/v1/twins/{ASSIGNED_MIN}/events", json=good).status_code == 422
        bulk = {"twins": [{"subject_id": ASSIGNED_MIN + 5, **good}]}
        assert c.post("/v1/twins:bulk", json=bulk).status_code == 422
        # the assigned twins are read like any other
        sid = c.post("/v1/fhir", json=patient_bundle("r", [("urn:test:mrn", uuid.uuid4().hex)])
                     ).json()["patients"][0]["subject_id"]
        assert c.get(f"/v1/twins/{sid}").status_code == 200


def test_bulk_is_all_or_nothing_and_bounded(core_server):
    t = "2020-01-01T10:00:00Z"
    good = [{"subject_id": 5_000_000 + k, "events": [
        {"time": t, "code": "LAB//EGFR", "numeric_value": 40.0 + k}]} for k in range(3)]
    bad = copy.deepcopy(good)
    bad[2]["events"][0]["numeric_value"] = 1e300  # beyond float32: refused, names the twin
    with core_server.client() as c:
        r = c.post("/v1/twins:bulk", json={"twins": bad})
        assert r.status_code == 422 and r.json()["fields"][0]["loc"][:3] == ["body", "twins", 2]
        assert c.get("/v1/twins/5000000").status_code == 404
        ok = c.post("/v1/twins:bulk", json={"twins": good})
        assert ok.status_code == 200, ok.text
        assert [x["added"] for x in ok.json()["twins"]] == [1, 1, 1]
        big = {"twins": [{"subject_id": k, "events": good[0]["events"]} for k in range(2001)]}
        assert c.post("/v1/twins:bulk", json=big).status_code == 413


# ------------------------------------------------------------------ refresh


def stale(server, version: str) -> int:
    store = open_store(server.db_url, migrate=False)
    try:
        with store.read() as s:
            return store.twins.count_stale(s, model_name("eskd"), version)
    finally:
        store.dispose()


def wait_refresh(server, version: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    with server.client("admin") as c:
        while True:
            job = c.get("/v1/admin/refresh").json()
            if job and job["model_version"] == version and job["state"] == "done":
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.2)


def wait_running(server, version: str, timeout: float = 60) -> dict:
    """The refresh to ``version`` once it is under way (some twins done, not all)."""
    deadline = time.monotonic() + timeout
    with server.client("admin") as c:
        while True:
            job = c.get("/v1/admin/refresh").json()
            if job and job["model_version"] == version and job["state"] == "running" \
                    and 0 < job["done"] < job["total"]:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)


def load_twins(server, small_cohort, trained, n: int = 400) -> list[int]:
    """``n`` twins (histories of held-out subjects under new ids), by the bulk route."""
    subjects = trained.heldout_rows["subject_id"].unique()
    twins = []
    for k in range(n):
        ev = history(small_cohort, trained, k % len(subjects))
        twins.append({"subject_id": 6_000_000 + k, "events": api_events(ev)})
    with server.client() as c:
        for lo in range(0, n, 200):
            r = c.post("/v1/twins:bulk", json={"twins": twins[lo:lo + 200]})
            assert r.status_code == 200, r.text
    return [t["subject_id"] for t in twins]


def test_a_worker_killed_mid_refresh_and_a_roll_back_leave_every_twin_on_the_champion(
        core_server, small_cohort, trained):
    load_twins(core_server, small_cohort, trained)
    with core_server.client("admin") as c:
        first = c.get("/v1/model").json()["version"]
    version = promote_copy(core_server, "kill test")
    job = wait_running(core_server, version)  # then kill the worker running it
    pid = int(job["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    done = wait_refresh(core_server, version)
    assert done["verified"] and done["attempts"] >= 2 and done["worker"] != job["worker"]
    assert stale(core_server, version) == 0
    # moving the champion back to the earlier version re-forecasts every twin again
    Tracker(core_server.tracking_uri).registry.promote(
        model_name("eskd"), first, actor="test", kind="manual", reason="roll back",
        task_name="eskd")
    wait_refresh(core_server, first)
    assert stale(core_server, first) == 0
    store = open_store(core_server.db_url, migrate=False)
    with store.read() as s:
        latest = s.execute(select(Forecast.subject_id, Forecast.model_version)
                           .order_by(Forecast.seq)).all()
    store.dispose()
    last = dict(latest)  # each twin's newest forecast
    assert set(last.values()) == {first}


def test_writes_during_a_refresh_neither_deadlock_nor_wait_long(core_server, small_cohort,
                                                                trained):
    ids = load_twins(core_server, small_cohort, trained, 200)
    version = promote_copy(core_server, "busy test")
    running = wait_running(core_server, version)
    tag = uuid.uuid4().hex[:8]
    # fifty patients in descending identifier order, one event per twin route, meanwhile
    fifty = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    for k in reversed(range(50)):
        b = patient_bundle(f"d{k}", [("urn:test:desc", f"{tag}-{k:02d}")], n_obs=2)
        fifty["entry"] += b["entry"]
    latencies = []
    with core_server.client() as c:
        r = c.post("/v1/fhir", json=fifty)
        assert r.status_code == 200, r.text
        assert len({p["subject_id"] for p in r.json()["patients"]}) == 50
        for k, sid in enumerate(reversed(ids[:40])):
            t0 = time.perf_counter()
            r = c.post(f"/v1/twins/{sid}/events", json={"events": [
                {"time": "2023-06-01T10:00:00Z", "code": "VITAL//SBP",
                 "numeric_value": 120.0 + k}]})
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        with core_server.client("admin") as a:
            after = a.get("/v1/admin/refresh").json()
    # the writes really overlapped the refresh: it was under way before and after them
    # (it yields to the writes, so it need not have finished a chunk while they ran)
    assert after["model_version"] == version and after["state"] == "running", after
    assert running["done"] <= after["done"] < after["total"], (running, after)
    wait_refresh(core_server, version)
    assert stale(core_server, version) == 0
    # no request waited for a whole refresh (bench/serve_bench.py measures the tail)
    assert max(latencies) < 5.0, max(latencies)


# ------------------------------------------------------------------ parity


def package_predictions(server, requests: dict[int, tuple[pd.DataFrame, pd.Timestamp]]
                        ) -> dict[int, np.ndarray]:
    """The registered champion package's risks for each (history, time), in one call."""
    tracker = Tracker(server.tracking_uri)
    with tracker.active():
        model = mlflow.pyfunc.load_model(f"models:/{model_name('eskd')}@champion")
    parts = []
    for sid, (frame, at) in requests.items():
        f = frame.assign(subject_id=sid, code=frame["code"].astype(str))[
            ["subject_id", "time", "code", "numeric_value"]]
        parts += [f, pd.DataFrame({"subject_id": [sid], "time": [at], "code": [PREDICT_CODE],
                                   "numeric_value": [np.nan]})]
    req = pd.concat(parts, ignore_index=True)
    req["subject_id"] = req["subject_id"].astype(np.int64)
    req["time"] = req["time"].astype("datetime64[us]")
    req["numeric_value"] = req["numeric_value"].astype(np.float64)
    req["text_value"] = pd.Series([None] * len(req), dtype=object)
    out = model.predict(req)
    cols = ["risk_365d", "risk_730d", *(trajectory_output("LAB//EGFR", h, q)
                                        for h in (365, 730) for q in (0.1, 0.5, 0.9))]
    return {int(sid): row for sid, row in zip(out["subject_id"], out[cols].to_numpy(),
                                              strict=True)}


def served_numbers(fc: dict) -> list[float]:
    """A forecast's risks, then each trajectory's 10th, 50th and 90th percentiles, as the
    package's columns hold them (the served values are their float32 shortest text)."""
    paths = [v for t in fc["trajectories"] for v in
             (t["intervals"][0]["lower"], t["median"], t["intervals"][0]["upper"])]
    return [fc["risks"]["365d"], fc["risks"]["730d"], *paths]


def package_numbers(row: np.ndarray) -> list[float]:
    return [float(row[0]), float(row[1]), *shortest_f32(row[2:].astype(np.float32))]


def cds_call(server, body: dict, tenant: str = "t1") -> httpx.Response:
    url = f"{server.url}/cds-services/twincast-eskd"
    now = int(time.time())
    tok = jwt.encode({"iss": CDS_ISSUER, "aud": url, "exp": now + 300, "iat": now,
                      "jti": str(uuid.uuid4()), "tenant": tenant}, server.cds_private_key,
                     algorithm="RS384")
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {tok}"}, timeout=60)


def test_every_entry_point_stores_what_the_model_package_predicts(core_server, small_cohort,
                                                                   trained):
    """Events route, bulk route, FHIR bundle, CDS call, stateless forecast and refresh:
    one parity check against the registered package on the same histories."""
    got: dict[str, tuple[int, dict]] = {}
    frames: dict[int, tuple[pd.DataFrame, pd.Timestamp]] = {}
    ev = [history(small_cohort, trained, k) for k in (5, 6, 7)]
    with core_server.client() as c:
        r = c.post("/v1/twins/7100001/events", json={"events": api_events(ev[0])}).json()
        got["events"] = (7100001, r["forecast"])
        frames[7100001] = (ev[0], ev[0]["time"].max())
        r = c.post("/v1/twins:bulk", json={"twins": [
            {"subject_id": 7100002, "events": api_events(ev[1])}]}).json()
        got["bulk"] = (7100002, c.get("/v1/twins/7100002").json()["forecast"])
        assert got["bulk"][1]["forecast_id"] == r["twins"][0]["forecast_id"]
        frames[7100002] = (ev[1], ev[1]["time"].max())
        s = c.post("/v1/forecast", json={"events": api_events(ev[2]),
                                         "subject_id": 7100003}).json()
        got["stateless"] = (7100003, s)
        frames[7100003] = (ev[2], ev[2]["time"].max())
        bundle = patient_bundle("par", [("urn:test:parity", uuid.uuid4().hex)], n_obs=5)
        p = c.post("/v1/fhir", json=bundle).json()["patients"][0]
        got["fhir"] = (p["subject_id"], p["forecast"])
    conv = bundle_to_events(bundle)
    frame = import_to_frame(conv, {k: 0 for k in conv.patients})
    frames[got["fhir"][0]] = (frame, frame["time"].max())
    prefetch = patient_bundle("cds-par", [("urn:test:parity", uuid.uuid4().hex)], n_obs=3)
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": "cds-par", "userId": "Practitioner/1"},
            "prefetch": {"patient": prefetch["entry"][0]["resource"],
                         "observations": {"resourceType": "Bundle", "type": "searchset",
                                          "entry": prefetch["entry"][1:]}}}
    r = cds_call(core_server, body)
    assert r.status_code == 200, r.text
    sid = r.json()["twincast"]["subject_id"]
    got["cds"] = (sid, twin_state(core_server, sid)["forecast"])
    assert got["cds"][1]["forecast_id"] == r.json()["twincast"]["forecast_id"]
    conv = bundle_to_events(prefetch)
    frame = import_to_frame(conv, {k: 0 for k in conv.patients})
    frames[sid] = (frame, frame["time"].max())
    expected = package_predictions(core_server, frames)
    for route, (sid, fc) in got.items():
        assert fc["status"] == "ok", (route, fc)
        assert served_numbers(fc) == package_numbers(expected[sid]), route
    # the refresh: a new version (the same package) re-forecasts them identically
    version = promote_copy(core_server, "parity test")
    wait_refresh(core_server, version)
    for route, (sid, fc) in got.items():
        if route == "stateless":
            continue
        again = twin_state(core_server, sid)["forecast"]
        assert again["model"]["version"] == version, route
        assert again["forecast_id"] != fc["forecast_id"]
        assert served_numbers(again) == package_numbers(expected[sid]), route


def test_a_cds_call_links_the_patient_in_the_same_transaction(core_server):
    """The CDS patient id names the twin from the first call on; a second call without
    prefetch answers from it; another tenant's same patient id is another patient."""
    prefetch = patient_bundle("cds-1", [], n_obs=3)  # a logical id only
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": "cds-1"},
            "prefetch": {"patient": prefetch["entry"][0]["resource"],
                         "observations": {"resourceType": "Bundle", "type": "searchset",
                                          "entry": prefetch["entry"][1:]}}}
    first = cds_call(core_server, body)
    assert first.status_code == 200, first.text
    bare = {**body, "prefetch": {}}
    again = cds_call(core_server, bare)
    assert again.status_code == 200
    assert again.json()["twincast"]["subject_id"] == first.json()["twincast"]["subject_id"]
    assert cds_call(core_server, bare, tenant="t2").status_code == 412  # t2 never sent it
    other = cds_call(core_server, body, tenant="t2")
    assert other.status_code == 200, other.text
    sid_1, sid_2 = (r.json()["twincast"]["subject_id"] for r in (first, other))
    assert sid_1 != sid_2
    assert twin_state(core_server, sid_1)["event_count"] == \
        twin_state(core_server, sid_2)["event_count"] == 5  # nobody else's events
    mismatched = json.loads(json.dumps(body))
    mismatched["context"]["patientId"] = "someone-else"
    assert cds_call(core_server, mismatched).status_code == 422
