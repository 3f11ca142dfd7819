"""The twin service over real HTTP, once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from features.events import shortest_f32
from training.package import PREDICT_CODE, trajectory_output
from training.registry import CHAMPION, model_name
from training.tracking import Tracker

NEW_SUBJECT = 9_000_000  # ids not in the cohort: each test uses its own twin


def api_events(frame: pd.DataFrame) -> list[dict]:
    out = []
    for r in frame.itertuples():
        out.append({
            "time": None if pd.isna(r.time) else pd.Timestamp(r.time).isoformat() + "Z",
            "code": str(r.code),
            "numeric_value": None if pd.isna(r.numeric_value) else float(r.numeric_value),
        })
    return out


def history(small_cohort, trained, k: int = 0) -> pd.DataFrame:
    """A held-out subject's events up to (and excluding) its outcome or death."""
    subjects = trained.heldout_rows["subject_id"].unique()
    sid = int(subjects[k])
    ev = small_cohort[small_cohort["subject_id"] == sid]
    return ev[~ev["code"].isin(["DX//ESKD", "MEDS_DEATH", "ADMIN//END_OF_FOLLOWUP"])]


def counts(server, sid: int) -> tuple[int, int]:
    with server.client("auditor") as c:
        r = c.get(f"/v1/twins/{sid}")
        if r.status_code == 404:
            return 0, 0
        f = c.get(f"/v1/twins/{sid}/forecasts").json()
        return r.json()["event_count"], f["total"]


def package_prediction(server, frame: pd.DataFrame, sid: int, at, frame_out: bool = False):
    tracker = Tracker(server.tracking_uri)
    with tracker.active():
        model = mlflow.pyfunc.load_model(f"models:/{model_name('eskd')}@{CHAMPION}")
    req = frame.assign(subject_id=sid, code=frame["code"].astype(str))[
        ["subject_id", "time", "code", "numeric_value", "text_value"]]
    ask = pd.DataFrame({"subject_id": [sid], "time": [at], "code": [PREDICT_CODE],
                        "numeric_value": [np.nan], "text_value": [None]})
    req = pd.concat([req, ask], ignore_index=True)
    req["time"] = req["time"].astype("datetime64[us]")
    req["numeric_value"] = req["numeric_value"].astype(np.float64)
    req["text_value"] = req["text_value"].astype(object)
    out = model.predict(req)
    return out if frame_out else out[["risk_365d", "risk_730d"]].to_numpy()[0]


def test_ingest_then_read_back_and_equal_to_the_model_package(server, small_cohort, trained):
    sid = NEW_SUBJECT + 1
    ev = history(small_cohort, trained, 0)
    with server.client() as c:
        r = c.post(f"/v1/twins/{sid}/events", json={"events": api_events(ev)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["added"] == len(ev) and body["duplicates"] == 0
        fc = body["forecast"]
        assert fc["status"] == "ok" and fc["model"]["name"] == "twincast-eskd"
        assert pd.Timestamp(fc["as_of"]).tz_convert(None) == ev["time"].max()
        got = c.get(f"/v1/twins/{sid}").json()
    assert got["event_count"] == len(ev)
    assert got["forecast"]["forecast_id"] == fc["forecast_id"]
    assert {v["code"] for v in got["latest_values"]} == set(ev["code"].astype(str))
    package = package_prediction(server, ev, sid, ev["time"].max(), frame_out=True)
    expected = package[["risk_365d", "risk_730d"]].to_numpy()[0]
    np.testing.assert_array_equal([fc["risks"]["365d"], fc["risks"]["730d"]], expected)
    # the trajectories too: median and interval as the package gives them (float32 text)
    assert [(t["code"], t["horizon_days"]) for t in fc["trajectories"]] == [
        ("LAB//EGFR", 365), ("LAB//EGFR", 730)]
    for t in fc["trajectories"]:
        cols = [trajectory_output(t["code"], t["horizon_days"], q) for q in (0.1, 0.5, 0.9)]
        want = shortest_f32(package[cols].to_numpy()[0].astype(np.float32))
        got = [t["intervals"][0]["lower"], t["median"], t["intervals"][0]["upper"]]
        assert got == want and t["unit"] == "ml/min/1.73m²" and t["intervals"][0]["level"] == 0.8
    assert fc["risks"]["365d"] <= fc["risks"]["730d"]
    assert fc["contributions"] and "log-odds" in fc["contributions"][0]["text"]


def test_resending_a_batch_adds_nothing(server, small_cohort, trained):
    sid = NEW_SUBJECT + 2
    events = api_events(history(small_cohort, trained, 1))
    with server.client() as c:
        first = c.post(f"/v1/twins/{sid}/events", json={"events": events}).json()
        again = c.post(f"/v1/twins/{sid}/events", json={"events": events}).json()
        # client event ids make re-sends idempotent too
        tagged = [{**events[0], "event_id": "abc-1", "numeric_value": 1.0, "code": "LAB//X"}]
        c.post(f"/v1/twins/{sid}/events", json={"events": tagged})
        c.post(f"/v1/twins/{sid}/events", json={"events": tagged})
    assert again["added"] == 0 and again["duplicates"] == len(events)
    assert again["forecast"]["forecast_id"] == first["forecast"]["forecast_id"]
    assert counts(server, sid) == (len(events) + 1, 2)


@pytest.mark.parametrize(
    ("role", "method", "path", "body", "status"),
    [
        (None, "post", "/v1/twins/{sid}/events", "good", 401),
        ("bogus", "post", "/v1/twins/{sid}/events", "good", 401),
        ("auditor", "post", "/v1/twins/{sid}/events", "good", 403),
        ("clinical", "post", "/v1/admin/reload", None, 403),
        ("clinical", "get", "/v1/access-log", None, 403),
        ("clinical", "post", "/v1/twins/{sid}/events", {"events": []}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events", {"events": "x"}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events", {"evnts": []}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events",
         {"events": [{"time": "2020-01-01T10:00:00", "code": "LAB//EGFR"}]}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events",
         {"events": [{"time": "2999-01-01T10:00:00Z", "code": "LAB//EGFR"}]}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events",
         {"events": [{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR",
                      "numeric_value": "NaN"}]}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events",
         {"events": [{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR", "colour": 1}]}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events",
         {"events": [{"time": "2020-01-01T10:00:00Z", "code": "has space"}]}, 422),
        ("clinical", "post", "/v1/twins/{sid}/events",
         {"events": [{"time": "2020-01-01T10:00:00Z", "code": "A//B"}] * 1001}, 422),
        ("clinical", "post", "/v1/twins/-5/events", "good", 422),
        ("clinical", "post", "/v1/twins/abc/events", "good", 422),
        ("clinical", "post", "/v1/twins/99999999999999999999/events", "good", 422),
        ("clinical", "get", "/v1/twins/{sid}", None, 404),
        ("clinical", "post", "/v1/forecast", {"events": [], "subject_id": 1}, 422),
    ],
)
def test_refusals_write_nothing(server, role, method, path, body, status):
    sid = NEW_SUBJECT + 3
    good = {"events": [{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR",
                        "numeric_value": 40.0}]}
    headers = {}
    if role == "bogus":
        headers = {"Authorization": "Bearer tc_not-a-real-key"}
    with server.client(None if role in (None, "bogus") else role, headers=headers) as c:
        kw = {} if body is None else {"json": good if body == "good" else body}
        r = getattr(c, method)(path.format(sid=sid), **kw)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] and err["message"]
    if status == 422 and "fields" in err and err["fields"]:
        assert all("input" not in f for f in err["fields"])  # values are not echoed
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert counts(server, sid) == (0, 0)


def test_garbage_never_gets_a_500(server):
    with server.client() as c:
        for content, ctype in [(b"{not json", "application/json"), (b"\xff\xfe", "text/plain"),
                               (b"[]", "application/json"), (b"null", "application/json"),
                               (b'{"events": [{"time": 1e308, "code": "A"}]}',
                                "application/json"),
                               (b'{"events": [{"time": "2020-01-01T00:00:00Z", "code": "A", '
                                b'"numeric_value": 1e400}]}', "application/json")]:
            r = c.post(f"/v1/twins/{NEW_SUBJECT + 4}/events", content=content,
                       headers={"content-type": ctype})
            assert 400 <= r.status_code < 500, (content, r.status_code, r.text)


def test_sixteen_clients_at_once_lose_nothing(server, small_cohort, trained):
    sid = NEW_SUBJECT + 5
    base = history(small_cohort, trained, 2)
    with server.client() as c:
        assert c.post(f"/v1/twins/{sid}/events", json={"events": api_events(base)}
                      ).status_code == 200
    last = base["time"].max()
    extra = [{"time": (last + pd.Timedelta(days=1 + i)).isoformat() + "Z",
              "code": "LAB//EGFR", "numeric_value": 20.0 + i} for i in range(16)]

    def post(e):
        with server.client() as c:
            return c.post(f"/v1/twins/{sid}/events", json={"events": [e]}).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(post, extra)) == [200] * 16
    n_events, n_forecasts = counts(server, sid)
    assert n_events == len(base) + 16 and n_forecasts == 17
    with server.client() as c:
        current = c.get(f"/v1/twins/{sid}").json()["forecast"]
        everything = api_events(base) + extra
        fresh = c.post("/v1/forecast", json={"events": everything, "subject_id": sid}).json()
    assert pd.Timestamp(current["as_of"]) == pd.Timestamp(extra[-1]["time"])
    assert current["risks"] == fresh["risks"] and not fresh["stored"]


def test_access_log_names_the_key(server, small_cohort, trained):
    sid = NEW_SUBJECT + 6
    with server.client() as c:
        c.post(f"/v1/twins/{sid}/events", json={"events": api_events(
            history(small_cohort, trained, 3))})
    with server.client("auditor") as c:
        c.get(f"/v1/twins/{sid}")
        rows = c.get("/v1/access-log", params={"subject_id": sid}).json()
    got = {(r["key_name"], r["action"], r["status_code"]) for r in rows}
    assert ("clinical-key", "ingest_events", 200) in got
    assert ("auditor-key", "read_twin", 200) in got
    assert all("tc_" not in str(r) for r in rows)


def test_metrics_and_docs_need_a_key(server):
    assert httpx_get(server, "/metrics", None) == 401
    assert httpx_get(server, "/v1/docs", None) == 401
    assert httpx_get(server, "/metrics", "auditor") == 200
    assert httpx_get(server, "/v1/openapi.json", "auditor") == 200
    assert httpx_get(server, "/v1/health", None) == 200
    assert httpx_get(server, "/v1/ready", None) == 200


def httpx_get(server, path, role):
    with server.client(role) as c:
        return c.get(path).status_code


def promote_copy(server, reason: str) -> str:
    """Register the champion's package again as a new version and promote it by hand."""
    reg = Tracker(server.tracking_uri).registry
    name = model_name("eskd")
    champ = reg.version_by_alias(name, CHAMPION)
    mv = reg.register(name, champ.source, champ.run_id, {"family": "copy"})
    reg.promote(name, str(mv.version), actor="test", kind="manual", reason=reason,
                task_name="eskd")
    return str(mv.version)


def test_new_champion_then_reload_reforecasts_every_twin(server, small_cohort, trained):
    sids = [NEW_SUBJECT + 100 + k for k in range(3)]
    with server.client() as c:
        for k, sid in enumerate(sids):
            c.post(f"/v1/twins/{sid}/events", json={"events": api_events(
                history(small_cohort, trained, 4 + k))})
    version = promote_copy(server, "reload test")  # a new version of the same package
    with server.client("admin") as c:
        r = c.post("/v1/admin/reload")
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while True:
            job = c.get("/v1/admin/refresh").json()
            if job and job["model_version"] == version and job["state"] == "done":
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert c.get("/v1/model").json()["version"] == version
        with server.client("auditor") as a:
            for sid in [*sids, NEW_SUBJECT + 1]:
                tw = a.get(f"/v1/twins/{sid}")
                if tw.status_code == 404:
                    continue
                assert tw.json()["forecast"]["model"]["version"] == version
    assert job["total"] == job["done"] >= len(sids)


def test_the_service_notices_an_alias_move_by_itself(server):
    """No reload call: the champion watcher (1 s here) loads the new version."""
    version = promote_copy(server, "watch test")
    deadline = time.monotonic() + 30
    with server.client("auditor") as c:
        while c.get("/v1/model").json()["version"] != version:
            assert time.monotonic() < deadline, "the alias move was not noticed"
            time.sleep(0.3)


def hostile_requests() -> list[tuple[str, str, dict]]:
    """What an attacker sends: odd path ids, times at the edges of the representable
    range with extreme offsets, deeply nested JSON, wrong shapes everywhere."""
    deep = "[" * 100_000 + "]" * 100_000
    deep_obj = '{"a":' * 50_000 + "1" + "}" * 50_000
    ev = {"code": "LAB//EGFR", "numeric_value": 40.0}
    reqs: list[tuple[str, str, dict]] = []
    for sid in ("%00", "1e5", "0x10", "-0", "+5", " 5", "9" * 400, "%F0%9F%98%80", "5.0",
                "4503599627370496", "9007199254740992"):
        reqs += [("get", f"/v1/twins/{sid}", {}), ("get", f"/v1/twins/{sid}/forecasts", {}),
                 ("post", f"/v1/twins/{sid}/events", {"json": {"events": [
                     {**ev, "time": "2020-01-01T00:00:00Z"}]}})]
    for t in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00Z",
              "2020-01-01T00:00:00+24:00", "2020-13-01T00:00:00Z", "-0001-01-01T00:00:00Z",
              "2020-01-01T00:00:00.9999999999Z", "1e308", "", "now"):
        reqs += [("post", "/v1/twins/5/events", {"json": {"events": [{**ev, "time": t}]}}),
                 ("post", "/v1/twins/5/events", {"json": {"events": [
                     {**ev, "time": "2020-01-01T00:00:00Z"}], "as_of": t}}),
                 ("post", "/v1/forecast", {"json": {"events": [{**ev, "time": t}]}})]
        reqs.append(("post", "/v1/fhir", {"json": {
            "resourceType": "Bundle", "type": "collection", "entry": [
                {"resource": {"resourceType": "Patient", "id": "h", "birthDate": t}}]}}))
    for path in ("/v1/twins/5/events", "/v1/twins:bulk", "/v1/forecast", "/v1/fhir",
                 "/cds-services/twincast-eskd", "/cds-services/twincast-eskd/feedback"):
        for body in (deep, deep_obj, '{"events": ' + deep + "}", '"x"', "1" * 5000):
            reqs.append(("post", path, {"content": body.encode(),
                                        "headers": {"content-type": "application/json"}}))
    reqs += [("get", "/cds-services/%0A%1C%C2%A4", {}),  # control characters: no route
             ("post", "/cds-services/%0Ax", {"json": {}}),
             ("delete", "/v1/twins/5", {}), ("put", "/v1/fhir", {"json": {}}),
             ("post", "/v1/twins/5/events", {"json": {"events": [
                 {**ev, "time": 1577836800}]}}),  # a number is not a time
             ("post", "/v1/twins/5/events", {"json": {"events": [
                 {**ev, "time": "2020-01-01T00:00:00Z", "numeric_value": True}]}}),
             ("get", "/v1/twins/5/forecasts?limit=abc", {}),
             ("get", "/v1/twins/5/forecasts?offset=99999999999999999999", {}),
             ("get", "/v1/access-log?subject_id=-1", {}),
             ("get", "/v1/audit/forecasts/" + "x" * 5000, {}),
             ("post", "/v1/twins:bulk", {"json": {"twins": {"subject_id": 1}}}),
             ("post", "/v1/twins:bulk", {"json": {"twins": [{"subject_id": 2**70,
                                                             "events": []}]}}),
             ("post", "/cds-services/twincast-eskd", {"json": {
                 "hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p"},
                 "prefetch": {"patient": {"resourceType": "Patient", "id": "p"},
                              "observations": {"resourceType": "Bundle", "entry": None}}}}),
             ("post", "/cds-services/twincast-eskd", {"json": {
                 "hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p"},
                 "prefetch": ["not", "an", "object"]}}),
             ("post", "/v1/fhir", {"json": {"resourceType": "Bundle", "type": "collection",
                                            "entry": [{"resource": {
                                                "resourceType": "Patient", "id": 7,
                                                "identifier": 7}}]}})]
    return reqs


def test_hostile_input_never_gets_a_500(server):
    with server.client("admin") as c:
        for method, path, kw in hostile_requests():
            r = getattr(c, method)(path, **kw)
            assert r.status_code < 500, (method, path[:80], r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("application/json"), path[:80]
