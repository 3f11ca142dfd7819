"""PostgreSQL restarted in the middle of concurrent ingest, against a private cluster the
test starts and stops itself (never the machine's shared server): every answer is a 200
or a JSON 503, clients that retry with the same event ids converge to exactly one copy
of each event, nothing is half-written, and the service recovers by itself."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from serving.store import open_store
from serving.store.models import Event, Forecast, Twin
from tests.conftest import free_port
from tests.serving.conftest import start_server

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


class PrivateCluster:
    """initdb + pg_ctl as the ``postgres`` user (initdb refuses root), on its own port."""

    def __init__(self, root: Path):
        self.dir = root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/twins"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir.parent, "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E",
                  "UTF8")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "twins")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-w", "-l", str(self.dir / "log"), "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-w", "-m", mode, "stop", check=False)


@pytest.fixture
def cluster():
    if PG_BIN is None or (shutil.which("runuser") is None and os.geteuid() == 0):
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL's server binaries are needed for the fault test")
        pytest.skip("no PostgreSQL server binaries here")
    # not under pytest's own folders: they are private to root, and the server runs as
    # postgres
    root = Path(tempfile.mkdtemp(prefix="twincast-pgfault-"))
    c = PrivateCluster(root)
    try:
        c.init()
        yield c
    finally:
        c.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_restarted_mid_ingest_loses_and_doubles_nothing(cluster, trained,
                                                                   mlflow_home,
                                                                   tmp_path_factory):
    twins, per_twin, clients = 24, 12, 8
    with start_server("pgfault", tmp_path_factory, mlflow_home, db_url=cluster.url,
                      env={"TWINCAST_WORKERS": "2"}) as server:
        answers: list[tuple[int, str]] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + 150

        def send(sid: int, k: int) -> None:
            body = {"events": [{"time": f"2021-{1 + k % 12:02d}-0{1 + k // 12}T08:00:00Z",
                                "code": "LAB//EGFR", "numeric_value": 50.0 - k,
                                "event_id": f"fault-{sid}-{k}"}]}
            with server.client() as c:
                while time.monotonic() < stop_at:  # a client retries until it gets 200
                    try:
                        r = c.post(f"/v1/twins/{sid}/events", json=body)
                    except httpx.HTTPError as exc:
                        with lock:
                            answers.append((0, type(exc).__name__))
                        time.sleep(0.2)
                        continue
                    with lock:
                        answers.append((r.status_code, r.headers.get("content-type", "")))
                    if r.status_code == 200:
                        return
                    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
                    time.sleep(0.2)
                raise AssertionError(f"twin {sid} event {k} never got through")

        work = [(7_500_000 + t, k) for k in range(per_twin) for t in range(twins)]
        with cf.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(send, sid, k) for sid, k in work]
            time.sleep(1.5)  # ingest under way
            cluster.stop("fast")
            down_at = time.monotonic()
            time.sleep(3.0)
            cluster.start()
            up_at = time.monotonic()
            for f in futures:
                f.result(timeout=200)
        # the first 200 after the database came back: the service recovered by itself
        with server.client() as c:
            r = c.get(f"/v1/twins/{work[0][0]}")
            assert r.status_code == 200
    statuses = {s for s, _ in answers}
    assert statuses <= {200, 503}, statuses  # never a 500, never a dropped connection
    assert all(ct.startswith("application/json") for _, ct in answers)
    assert 503 in statuses, "the restart did not land in the ingest"
    store = open_store(cluster.url, migrate=False)
    with store.read() as s:
        per = dict(s.execute(select(Event.subject_id, func.count()).where(
            Event.subject_id >= 7_500_000).group_by(Event.subject_id)).all())
        views = dict(s.execute(select(Twin.subject_id, Twin.event_count).where(
            Twin.subject_id >= 7_500_000)).all())
        fcs = dict(s.execute(select(Forecast.subject_id, func.count()).where(
            Forecast.subject_id >= 7_500_000).group_by(Forecast.subject_id)).all())
    store.dispose()
    assert per == {7_500_000 + t: per_twin for t in range(twins)}  # each event exactly once
    assert views == per  # the views agree with the events: nothing half-written
    assert fcs == per    # one forecast per stored event: each write was whole
    print(f"database down {up_at - down_at:.1f}s; {sum(s == 503 for s, _ in answers)} "
          f"answers 503 meanwhile; all {len(work)} events stored once")
