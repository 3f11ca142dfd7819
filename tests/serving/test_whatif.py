"""What-if over real HTTP (SQLite and PostgreSQL): the same computation as a stored
forecast, at one explicit as-of time, storing nothing, logged, always associational; and
the offline command gives the same answer from a MEDS directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.serving.test_service import api_events, counts, history

SUBJECT = 9_400_000
BIN = Path(sys.executable).parent / "twincast"


def twin(server, small_cohort, trained, sid: int, k: int) -> tuple[pd.DataFrame, dict]:
    ev = history(small_cohort, trained, k)
    with server.client() as c:
        r = c.post(f"/v1/twins/{sid}/events", json={"events": api_events(ev)})
    assert r.status_code == 200, r.text
    return ev, r.json()["forecast"]


def last_egfr(ev: pd.DataFrame) -> float:
    return float(ev[ev["code"] == "LAB//EGFR"].sort_values("time")["numeric_value"].iloc[-1])


def test_what_if_stores_nothing_and_its_baseline_is_the_twins_forecast(server, small_cohort,
                                                                       trained):
    sid = SUBJECT + 1
    _, fc = twin(server, small_cohort, trained, sid, 0)
    assert fc["status"] == "ok" and fc["trajectories"]
    before = counts(server, sid)
    with server.client("auditor") as c:
        view = c.get(f"/v1/twins/{sid}").json()
    scenario = {"events": [{"code": "LAB//EGFR", "numeric_value": 9.0}]}
    with server.client() as c:
        r = c.post(f"/v1/twins/{sid}/what-if", json=scenario)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["interpretation"] == "associational" and not body["stored"]
    assert "confounding by indication" in body["interpretation_text"]
    assert body["as_of"] == fc["as_of"]  # the twin's latest event, explicit in the answer
    assert body["baseline"]["risks"] == fc["risks"]
    assert body["baseline"]["trajectories"] == fc["trajectories"]
    # nothing stored, nothing changed
    assert counts(server, sid) == before
    with server.client("auditor") as c:
        assert c.get(f"/v1/twins/{sid}").json() == view
        log = c.get("/v1/access-log", params={"subject_id": sid}).json()
    assert ("clinical-key", "what_if", 200) in {(x["key_name"], x["action"], x["status_code"])
                                                for x in log}


def test_a_much_lower_egfr_raises_the_risk_and_lowers_the_egfr_trajectory(
        server, small_cohort, trained):
    sid = SUBJECT + 2
    ev, _ = twin(server, small_cohort, trained, sid, 1)
    low = max(5.0, last_egfr(ev) * 0.3)
    with server.client() as c:
        body = c.post(f"/v1/twins/{sid}/what-if", json={"events": [
            {"code": "LAB//EGFR", "numeric_value": low}]}).json()
    diff = body["difference"]
    assert all(d > 0 for d in diff["risks"].values()), diff
    egfr = [d for d in diff["trajectories"] if d["code"] == "LAB//EGFR"]
    assert len(egfr) == 2 and all(d["median"] < 0 for d in egfr), egfr
    for path in body["scenario"]["trajectories"]:
        for i in path["intervals"]:  # never crossing
            assert i["lower"] <= path["median"] <= i["upper"]


def test_an_explicit_as_of_moves_both_answers_together(server, small_cohort, trained):
    sid = SUBJECT + 3
    ev, _ = twin(server, small_cohort, trained, sid, 2)
    times = sorted(ev["time"].dropna().unique())
    earlier = pd.Timestamp(times[len(times) // 2]).isoformat() + "Z"
    with server.client() as c:
        body = c.post(f"/v1/twins/{sid}/what-if", json={
            "events": [{"code": "VITAL//SBP", "numeric_value": 125.0}],
            "as_of": earlier}).json()
        fresh = c.post("/v1/forecast", json={
            "subject_id": sid, "events": api_events(ev), "as_of": earlier}).json()
    assert pd.Timestamp(body["as_of"]) == pd.Timestamp(earlier)
    assert body["scenario_events"][0]["time"] == body["as_of"]
    assert body["baseline"]["risks"] == fresh["risks"]  # the stateless forecast, same time
    assert body["baseline"]["trajectories"] == fresh["trajectories"]


@pytest.mark.parametrize(("role", "events", "status", "words"), [
    ("clinical", [{"code": "RX//SGLT2"}], 403, "what_if.allowed_codes"),
    ("clinical", [{"code": "RX//ACEI"}], 200, None),  # listed in the task's allowed_codes
    ("clinical", [{"code": "VITAL//SBP", "numeric_value": 120.0},
                  {"code": "VITAL//SBP", "numeric_value": 130.0}], 422, "appears twice"),
    ("clinical", [{"code": "VITAL//SBP", "numeric_value": 125.0}, {"code": "RX//SGLT2"}],
     403, "RX//SGLT2"),
    ("auditor", [{"code": "RX//SGLT2"}], 200, None),
    ("admin", [{"code": "RX//SGLT2"}], 200, None),
    ("clinical", [{"code": "DX//ESKD"}], 422, "outcome"),
    ("clinical", [{"code": "LAB//NEVER_SEEN", "numeric_value": 1.0}], 422, "not an event code"),
    ("clinical", [{"code": "LAB//EGFR"}], 422, "numeric_value"),
    ("clinical", [{"code": "RX//ACEI", "numeric_value": 3.0}], 422, "carries no value"),
    ("clinical", [{"code": "LAB//EGFR", "numeric_value": 1e39}], 422, "float32"),
    ("clinical", [{"code": "LAB//EGFR", "numeric_value": 20, "time": "2020-01-01T00:00:00Z"}],
     422, None),
    ("clinical", [], 422, None),
    (None, [{"code": "VITAL//SBP", "numeric_value": 125.0}], 401, None),
])
def test_roles_and_bad_scenarios(server, small_cohort, trained, role, events, status, words):
    sid = SUBJECT + 4
    with server.client() as c:
        if c.get(f"/v1/twins/{sid}").status_code == 404:
            twin(server, small_cohort, trained, sid, 3)
    before = counts(server, sid)
    with server.client(role) as c:
        r = c.post(f"/v1/twins/{sid}/what-if", json={"events": events})
    assert r.status_code == status, r.text
    if words:
        assert words in r.text
    if status == 200:
        assert r.json()["interpretation"] == "associational"
    assert counts(server, sid) == before


def test_what_if_of_an_unknown_twin_is_404(server):
    with server.client() as c:
        r = c.post(f"/v1/twins/{SUBJECT + 99}/what-if",
                   json={"events": [{"code": "VITAL//SBP", "numeric_value": 125.0}]})
    assert r.status_code == 404


def test_offline_what_if_equals_the_service(server, small_cohort, trained, tmp_path):
    from features.events import write_meds
    from features.simulate import CODES

    sid = SUBJECT + 5
    k = 4
    ev, _ = twin(server, small_cohort, trained, sid, k)
    scenario = {"events": [{"code": "RX//SGLT2"}, {"code": "VITAL//SBP",
                                                    "numeric_value": 125.0}]}
    with server.client("admin") as c:
        online = c.post(f"/v1/twins/{sid}/what-if", json=scenario).json()
    meds = write_meds(ev.assign(subject_id=sid), tmp_path / "meds", codes=CODES)
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    env = {**os.environ, "TWINCAST_HOME": str(tmp_path / ".twincast"),
           "TWINCAST_MLFLOW_URI": server.tracking_uri}
    proc = subprocess.run([str(BIN), "what-if", "--subject", str(sid), "--events",
                           str(tmp_path / "scenario.json"), "--meds", str(meds), "--task",
                           "eskd", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    offline = json.loads(proc.stdout)
    for key in ("as_of", "baseline", "scenario", "difference", "interpretation"):
        assert offline[key] == online[key], key
    words = subprocess.run([str(BIN), "what-if", "--subject", str(sid), "--events",
                            str(tmp_path / "scenario.json"), "--meds", str(meds), "--task",
                            "eskd"], capture_output=True, text=True, env=env, timeout=300)
    assert words.returncode == 0 and "confounding by indication" in words.stdout


def test_an_as_of_before_any_visit_is_not_eligible_in_both(server, small_cohort, trained):
    """The scenario's own events never make a twin eligible: before the first visit
    both answers say why there is no forecast."""
    sid = SUBJECT + 6
    twin(server, small_cohort, trained, sid, 5)
    with server.client() as c:
        body = c.post(f"/v1/twins/{sid}/what-if", json={
            "events": [{"code": "VITAL//SBP", "numeric_value": 125.0}],
            "as_of": "1900-01-01T00:00:00Z"}).json()
    assert body["baseline"]["status"] == body["scenario"]["status"] == "not_eligible"
    assert body["scenario"]["reason"] == body["baseline"]["reason"]
    assert body["scenario"]["risks"] is None and body["difference"] is None


def test_a_scenario_value_replaces_one_measured_at_the_same_time(trained):
    """At the default as-of time the twin's last visit may have measured the same code:
    the scenario's value is then the last value, lower or higher."""
    import numpy as np

    from features.events import EventArrays
    from serving.store.twins import event_arrays
    from serving.whatif import ScenarioEvent, _with_scenario

    bundle = trained.candidates[trained.best].bundle
    at = np.datetime64("2020-06-01T09:00", "us").astype(object)  # naive UTC, as stored
    rows = [(1, np.datetime64("1960-01-01", "us"), "MEDS_BIRTH", np.nan),
            (1, np.datetime64("2020-01-01T09:00", "us"), "LAB//EGFR", 60.0),
            (1, at, "LAB//EGFR", 52.0), (1, at, "VITAL//SBP", 140.0)]
    base = event_arrays(rows)
    col = bundle.spec.feature_names.index("LAB//EGFR__all__last")
    t = np.array([np.datetime64(at, "us").view(np.int64)])
    for value in (5.0, 200.0):
        arrays = _with_scenario(base, 1, -1, at, [ScenarioEvent("LAB//EGFR", value)])
        assert isinstance(arrays, EventArrays) and len(arrays) == 2 * len(base)
        x = bundle.features_for(arrays, np.array([-1, 1]), np.r_[t, t])
        assert x[0, col] == value and x[1, col] == 52.0  # the scenario; the twin as it is
