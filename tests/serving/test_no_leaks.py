"""Patient data stays in the twin store: values sent through every route, error paths
included, appear in none of the service's logs, its metrics, or the MLflow store."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx

from tests.serving.test_cds import SERVICE, hook, token
from tests.serving.test_service import api_events, history

SENTINEL = "ZQXJ" + uuid.uuid4().hex[:8].upper()  # a value no code or library prints
NUMBER = 98765.4321


def sentinel_requests(sid: int, events: list[dict]) -> list[tuple[str, str, dict]]:
    good = [*events, {"time": events[-1]["time"], "code": "NOTE//FREE_TEXT",
                      "text_value": f"patient says {SENTINEL}", "event_id": f"e-{SENTINEL}"},
            {"time": events[-1]["time"], "code": "LAB//EGFR", "numeric_value": NUMBER}]
    patient = {"resourceType": "Patient", "id": f"p-{SENTINEL}", "gender": "female",
               "birthDate": "1950-01-01", "name": [{"family": SENTINEL}],
               "identifier": [{"system": "urn:mrn", "value": f"mrn-{SENTINEL}"}]}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient}]}
    bad_bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {**patient, "birthDate": f"not-a-date-{SENTINEL}"}}]}
    return [
        ("post", f"/v1/twins/{sid}/events", {"json": {"events": good}}),
        ("post", f"/v1/twins/{sid}/events", {"json": {"events": [  # 422 paths
            {"time": "2020-01-01T00:00:00Z", "code": f"bad code {SENTINEL}"}]}}),
        ("post", f"/v1/twins/{sid}/events", {"json": {"events": [
            {"time": f"{SENTINEL}", "code": "LAB//EGFR"}]}}),
        ("post", f"/v1/twins/{sid}/events", {"json": {"events": [
            {"time": "2020-01-01T00:00:00Z", "code": "LAB//EGFR", SENTINEL: NUMBER}]}}),
        ("post", f"/v1/twins/{sid}/events", {"content": f'{{"events": [{SENTINEL}',
                                              "headers": {"content-type": "application/json"}}),
        ("post", "/v1/twins:bulk", {"json": {"twins": [{"subject_id": sid + 1,
                                                        "events": good}]}}),
        ("post", "/v1/twins:bulk", {"json": {"twins": [{"subject_id": SENTINEL}]}}),
        ("post", "/v1/forecast", {"json": {"subject_id": sid, "events": good}}),
        ("post", "/v1/forecast", {"json": {"events": [{"code": SENTINEL, "time": None,
                                                       "numeric_value": "x"}]}}),
        ("post", "/v1/fhir", {"json": bundle}),
        ("post", "/v1/fhir", {"json": bad_bundle}),
        ("get", f"/v1/twins/{sid}", {}),
        ("get", f"/v1/twins/{sid}/forecasts", {"params": {"limit": SENTINEL}}),
        ("get", f"/v1/twins/{sid}/forecast", {"params": {"format": "fhir"}}),
        ("get", f"/v1/access-log?subject_id={SENTINEL}", {}),
    ]


def test_sentinel_values_reach_no_log_metric_or_mlflow(server, small_cohort, trained):
    sid = 7_300_000 if "sqlite" in server.db_url else 7_300_100
    events = api_events(history(small_cohort, trained, 5))
    statuses = []
    with server.client("admin") as c:
        for method, path, kw in sentinel_requests(sid, events):
            statuses.append(getattr(c, method)(path, **kw).status_code)
        metrics = c.get("/metrics").text
    # a CDS call carrying the values in its prefetch and context, and a replayed token
    path = f"/cds-services/{SERVICE}"
    body = hook(f"cds-{SENTINEL}")
    body["prefetch"]["patient"]["name"] = [{"family": SENTINEL}]
    tok = token(server, server.url + path)
    for _ in range(2):
        statuses.append(httpx.post(server.url + path, json=body, timeout=60,
                                   headers={"Authorization": f"Bearer {tok}"}).status_code)
    assert 200 in statuses and 422 in statuses and 401 in statuses and max(statuses) < 500
    time.sleep(1.0)  # let the workers' log lines reach the file
    logs = (server.home / "server.log").read_text(errors="replace")
    assert "serving twincast-eskd version" in logs  # twincast's own lines are in this log
    import numpy as np

    for needle in (SENTINEL, str(NUMBER), repr(float(np.float32(NUMBER))), "98765.43"):
        assert needle not in logs, [ln for ln in logs.splitlines() if needle in ln][:3]
        assert needle not in metrics
    # the MLflow store (database and artifacts) holds no value either
    mlflow_files = [Path(server.tracking_uri.removeprefix("sqlite:///"))]
    mlflow_files += [p for p in (server.home / "mlartifacts").rglob("*") if p.is_file()] \
        if (server.home / "mlartifacts").exists() else []
    for f in mlflow_files:
        data = f.read_bytes()
        assert SENTINEL.encode() not in data and b"98765.4" not in data, f
