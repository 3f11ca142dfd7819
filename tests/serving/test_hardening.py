"""Hardening against a real service with two workers, on SQLite and PostgreSQL: keys
revoked at once everywhere, limits before parsing, the event loop never blocked by the
database, busy databases answered 503, and access rows that survive a SIGKILL."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from sqlalchemy import func, select

from serving.store import open_store
from serving.store.models import AccessLog, Event
from tests.serving.conftest import start_server
from tests.serving.test_service import api_events, history

SID = 7_100_000


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hard_server(request, trained, mlflow_home, tmp_path_factory):
    db = (None if request.param == "sqlite"
          else request.getfixturevalue("pg_database_module"))
    with start_server(request.param, tmp_path_factory, mlflow_home, db_url=db,
                      env={"TWINCAST_WORKERS": "2"}) as server:
        server.kind = request.param
        yield server


def fresh_get(server, path: str, key: str) -> int:
    """A request on its own connection (so the two workers share the requests)."""
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"},
                     timeout=30).status_code


def fresh_post(server, path: str, key: str, body) -> httpx.Response:
    return httpx.post(server.url + path, headers={"Authorization": f"Bearer {key}"},
                      content=body if isinstance(body, bytes) else None,
                      json=None if isinstance(body, bytes) else body, timeout=30)


def event_body(k: int) -> dict:
    return {"events": [{"time": f"2021-03-{1 + k % 28:02d}T{k % 24:02d}:00:00Z",
                        "code": "LAB//EGFR", "numeric_value": 40 + k}]}


def answered_rows(server, name: str) -> int:
    """The access log's rows of one key's answered (200) requests."""
    store = open_store(server.db_url, migrate=False)
    try:
        with store.read() as s:
            return s.execute(select(func.count()).select_from(AccessLog).where(
                AccessLog.key_name == name, AccessLog.status_code == 200)).scalar_one()
    finally:
        store.dispose()


def test_a_revoked_key_stops_at_once_in_every_worker(hard_server):
    """Also on the twin routes that take the key as the worker remembers it: their own
    transaction confirms it, so a key revoked by another process writes nothing, reads
    nothing and learns nothing (not even that a twin is missing or a body is bad)."""
    store = open_store(hard_server.db_url, migrate=False)
    name = f"ward-{uuid.uuid4().hex[:6]}"
    key = store.keys.create(name, "clinical")
    store.dispose()
    sid = SID + 9
    assert [fresh_get(hard_server, "/v1/model", key) for _ in range(16)] == [200] * 16
    # both workers remember the key from these
    assert [fresh_post(hard_server, f"/v1/twins/{sid}/events", key, event_body(k))
            .status_code for k in range(16)] == [200] * 16
    assert [fresh_get(hard_server, f"/v1/twins/{sid}", key) for _ in range(16)] == [200] * 16
    stored, answered = events_stored(hard_server, sid), answered_rows(hard_server, name)
    assert answered == 32  # one row per answered twin request
    env = {**os.environ, "TWINCAST_DATABASE_URL": hard_server.db_url,
           "TWINCAST_HOME": str(hard_server.home)}
    cli = subprocess.run([str(Path(sys.executable).parent / "twincast"), "keys", "revoke",
                          "--name", name], env=env, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and "every worker refuses it" in cli.stdout, cli.stderr
    assert [fresh_get(hard_server, "/v1/model", key) for _ in range(16)] == [401] * 16
    for k in range(16):  # new events, a bad body, a twin that exists and one that does not
        r = fresh_post(hard_server, f"/v1/twins/{sid}/events", key, event_body(100 + k))
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert fresh_post(hard_server, f"/v1/twins/{sid}/events", key,
                          b'{"events": [{"code": 5}]}').status_code == 401
        assert fresh_get(hard_server, f"/v1/twins/{sid}", key) == 401
        assert fresh_get(hard_server, f"/v1/twins/{SID + 99}", key) == 401
    assert events_stored(hard_server, sid) == stored  # nothing written for the revoked key
    assert answered_rows(hard_server, name) == answered  # and nothing answered for it


def events_stored(server, sid: int) -> int:
    store = open_store(server.db_url, migrate=False)
    try:
        with store.read() as s:
            return s.execute(select(func.count()).select_from(Event)
                             .where(Event.subject_id == sid)).scalar_one()
    finally:
        store.dispose()


def test_bodies_are_limited_before_parsing_sized_or_chunked(hard_server):
    sid = SID + 1
    one = b'{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR", "numeric_value": 40},'
    big = b'{"events": [' + one * (2**20 // len(one) + 1) + one[:-1] + b"]}"  # > 1 MiB

    def chunked(data: bytes, size: int = 65_536):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    with hard_server.client() as c:
        for content in (big, chunked(big)):
            r = c.post(f"/v1/twins/{sid}/events", content=content,
                       headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert r.json()["error"] == "payload_too_large"
        huge = b'{"hook": "patient-view", "x": "' + b"a" * (21 * 2**20) + b'"}'
        r = c.post("/cds-services/twincast-eskd", content=chunked(huge, 2**20),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        deep = b'{"events": [{"time": "2020-01-01T10:00:00Z", "code": "A//B", "text_value": ' \
               + b"[" * 100 + b"]" * 100 + b"}]}"
        for path in (f"/v1/twins/{sid}/events", "/v1/fhir", "/v1/forecast"):
            r = c.post(path, content=deep, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "nested deeper" in r.json()["message"], path
        many = {"resourceType": "Bundle", "type": "collection",
                "entry": [{"resource": {"resourceType": "Basic"}}] * 50_001}
        r = c.post("/v1/fhir", json=many)
        assert r.status_code == 413 and r.json()["fields"][0]["loc"] == ["body", "entry"]
    assert events_stored(hard_server, sid) == 0


def test_health_answers_and_writes_get_503_while_the_database_is_stuck(hard_server):
    """A write lock held outside the service: clinical writes wait a bounded time, then
    get a JSON 503 with Retry-After; health answers at once throughout; nothing is
    half-written.  On PostgreSQL the keys table is locked too, so every authenticated
    request blocks in the thread pool — readiness then says the store timed out."""
    sid = SID + 2
    body = {"events": [{"time": "2020-01-01T10:00:00Z", "code": "LAB//EGFR",
                        "numeric_value": 40.0}]}
    if hard_server.kind == "sqlite":
        conn = sqlite3.connect(hard_server.db_url.removeprefix("sqlite:///"),
                               isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
    else:
        conn = psycopg.connect(hard_server.db_url)
        conn.execute("LOCK TABLE api_keys, twins IN ACCESS EXCLUSIVE MODE")
    try:
        with cf.ThreadPoolExecutor(48) as pool:
            def post(_):
                with hard_server.client() as c:
                    return c.post(f"/v1/twins/{sid}/events", json=body)
            started = time.monotonic()
            futures = [pool.submit(post, k) for k in range(48)]
            time.sleep(1.0)
            t0 = time.perf_counter()
            health = httpx.get(hard_server.url + "/v1/health", timeout=5)
            assert health.status_code == 200 and time.perf_counter() - t0 < 1.0
            if hard_server.kind == "postgresql":
                # the 48 blocked requests fill the thread pool (or the connection pool)
                # as they arrive: on a loaded machine that can take a few seconds
                deadline = time.monotonic() + 8
                while True:
                    ready = httpx.get(hard_server.url + "/v1/ready", timeout=10)
                    if ready.status_code == 503 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert ready.status_code == 503, ready.text
                assert ready.json()["checks"]["store"] == "timeout"
                time.sleep(1.0)
                conn.rollback()  # release: the blocked requests go through
            answers = [f.result(timeout=120) for f in futures]
        waited = time.monotonic() - started
    finally:
        conn.rollback()
        conn.close()
    codes = sorted({r.status_code for r in answers})
    if hard_server.kind == "sqlite":
        assert codes == [503] and waited < 60, (codes, waited)
        assert all(r.headers["retry-after"] and r.json()["error"] == "unavailable"
                   for r in answers)
        assert events_stored(hard_server, sid) == 0
    else:
        assert codes == [200], codes  # one stored the event, the rest found it there
        assert events_stored(hard_server, sid) == 1


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_reads_answered_before_a_sigkill_are_all_in_the_access_log(
        kind, request, trained, mlflow_home, tmp_path_factory, small_cohort):
    db = None if kind == "sqlite" else request.getfixturevalue("pg_database")
    sid, n = SID + 3, 25
    with start_server(kind, tmp_path_factory, mlflow_home, db_url=db,
                      env={"TWINCAST_WORKERS": "2"}) as server:
        with server.client() as c:
            r = c.post(f"/v1/twins/{sid}/events", json={"events": api_events(
                history(small_cohort, trained, 1))})
            assert r.status_code == 200, r.text
            for _ in range(n):
                assert c.get(f"/v1/twins/{sid}").status_code == 200
        # every process of the service at once, with no chance to flush anything
        root = psutil.Process(server.proc.pid)
        for p in [*root.children(recursive=True), root]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        server.proc.wait(30)
        store = open_store(server.db_url, migrate=False)
        with store.read() as s:
            logged = s.execute(select(func.count()).select_from(AccessLog).where(
                AccessLog.subject_id == sid, AccessLog.action == "read_twin")).scalar_one()
        store.dispose()
    assert logged == n
