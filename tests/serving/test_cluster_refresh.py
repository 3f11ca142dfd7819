"""The all-twin refresh on a real Dask cluster (two worker processes), against real
databases and a real MLflow store: it re-forecasts every twin as the service's writer
does, refuses to run beside a live lease, survives a killed worker without writing a
twin twice, and a killed client's refresh resumes once its lease expires."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select, update

from features.cluster import Scheduler, connect
from serving.cluster_refresh import (
    LeaseLost,
    RefreshBusy,
    Target,
    adopt_champion,
    holder,
    refresh_twins,
)
from serving.imports import import_events
from serving.model_source import ModelSource
from serving.served import ModelHolder
from serving.states import RefreshState
from serving.store import open_store
from serving.store.models import Forecast, RefreshJob, Twin
from serving.store.twins import utcnow
from serving.writes import REFRESH_CALLER, TwinWriter
from tests.conftest import PG_ADMIN_URL, fresh_pg_database
from training.registry import CHAMPION, model_name
from training.tracking import Tracker

NAME = model_name("eskd")
MIRROR = 10_000_000  # the same histories again, refreshed in this process


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster: two worker processes, one thread each."""
    with connect(Scheduler.parse("local:2")) as client:
        yield client


@pytest.fixture
def registry(tracker, trained, tmp_path) -> Tracker:
    """A copy of the session's MLflow store (promotions here touch no other test)."""
    shutil.copy(tracker.tracking_uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tracker.artifact_root)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seed(request, small_cohort, tmp_path_factory):
    """A twin database holding the 400-patient cohort (stale twins: no forecast yet),
    imported once per backend; each test gets a copy (PostgreSQL: fails under CI=true
    when unreachable)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('seed') / 'twins.db'}"
        _import(url, small_cohort)
        yield url
        return
    with fresh_pg_database("twincast_seed") as url:
        _import(url, small_cohort)
        yield url


def _import(url: str, events) -> None:
    store = open_store(url)
    import_events(store, events)
    store.dispose()


@pytest.fixture
def database(seed, tmp_path):
    """A copy of the seeded database (PostgreSQL: ``CREATE DATABASE … TEMPLATE``)."""
    if seed.startswith("sqlite"):
        src = sqlite3.connect(seed.removeprefix("sqlite:///"))
        dst = sqlite3.connect(tmp_path / "twins.db")
        with src, dst:
            src.backup(dst)
        src.close()
        dst.close()
        yield f"sqlite:///{tmp_path / 'twins.db'}"
        return
    name = f"twincast_copy_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{seed.rsplit("/", 1)[1]}"')
        try:
            yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def twins(database):
    """The cohort's store, 400 stale twins."""
    store = open_store(database)
    assert n_twins(store) == 400
    yield store
    store.dispose()


def promote_copy(registry: Tracker) -> str:
    """The champion's package registered again as a new version, promoted by hand."""
    reg = registry.registry
    champ = reg.version_by_alias(NAME, CHAMPION)
    mv = reg.register(NAME, champ.source, champ.run_id, {"family": "copy"})
    reg.promote(NAME, str(mv.version), actor="test", kind="manual", reason="cluster test",
                task_name="eskd")
    return str(mv.version)


def target(store, registry: Tracker, version: str, **kw) -> Target:
    return Target(store.db.url, registry.tracking_uri, registry.artifact_root, "eskd",
                  version, **kw)


def stale(store, version: str) -> int:
    with store.read() as s:
        return store.twins.count_stale(s, NAME, version)


def refresh_forecasts(store, version: str) -> dict[int, int]:
    """Refresh forecasts per twin for ``version``."""
    with store.read() as s:
        rows = s.execute(select(Forecast.subject_id, func.count()).where(
            Forecast.model_version == version, Forecast.requested_by == REFRESH_CALLER)
            .group_by(Forecast.subject_id)).all()
    return dict(rows)


def n_twins(store) -> int:
    with store.read() as s:
        return s.execute(select(func.count()).select_from(Twin)).scalar_one()


def latest(store) -> dict[int, Forecast]:
    with store.read() as s:
        rows = s.execute(select(Forecast).order_by(Forecast.seq)).scalars().all()
    return {f.subject_id: f for f in rows}


def test_after_a_new_champion_every_twin_is_reforecast_as_the_service_writes_it(
        twins, registry, cluster, small_cohort):
    store = twins
    first = adopt_champion(store, ModelSource(registry, "eskd"), "test")
    done = refresh_twins(target(store, registry, first.version), None, model=first)
    assert done.refreshed == done.total == n_twins(store) == 400
    # a mirror of 60 patients under other ids, refreshed by the service's writer here
    keep = small_cohort["subject_id"].drop_duplicates().head(60)
    mirror = small_cohort[small_cohort["subject_id"].isin(keep)].assign(
        subject_id=lambda f: f["subject_id"] + MIRROR)
    import_events(store, mirror)
    version = promote_copy(registry)
    source = ModelSource(registry, "eskd")
    model = adopt_champion(store, source, "test")
    assert model.version == version != first.version
    writer = TwinWriter(store, ModelHolder(store, source, "test"))
    assert writer.refresh(sorted(int(s) + MIRROR for s in keep), model) == 60

    result = refresh_twins(target(store, registry, version), cluster, per_task=128)
    assert result.refreshed == result.total == 400 and result.passes == 1
    assert stale(store, version) == 0
    job = store.jobs.get(result.job)
    assert job.state == RefreshState.DONE and job.verified and job.worker.startswith("dask:")
    assert job.done == 400 and job.attempts == 1
    assert set(refresh_forecasts(store, version).values()) == {1}  # one each, no more
    last = latest(store)
    assert {f.model_version for f in last.values()} == {version}
    fields = ("status", "reason", "risks", "contributions", "trajectories", "as_of",
              "feature_digest", "feature_spec_digest", "task_digest", "run_id",
              "code_version")
    for sid in keep:
        got, want = last[int(sid)], last[int(sid) + MIRROR]
        assert {k: getattr(got, k) for k in fields} == {k: getattr(want, k) for k in fields}
    assert sum(f.status == "ok" for f in last.values()) > 100  # real risks, not just refusals


def test_a_live_service_lease_is_refused_and_nothing_is_written(twins, registry, cluster):
    store = twins
    model = adopt_champion(store, ModelSource(registry, "eskd"), "test")
    job = store.jobs.claim(NAME, model.version, "svc-host:4242", 60)
    assert job is not None
    with pytest.raises(RefreshBusy, match="svc-host:4242"):
        refresh_twins(target(store, registry, model.version), cluster)
    with store.read() as s:
        assert s.execute(select(func.count()).select_from(Forecast)).scalar_one() == 0
    held = store.jobs.get(job)
    assert held.state == RefreshState.RUNNING and held.worker == "svc-host:4242"
    assert held.attempts == 1


class Background(threading.Thread):
    """``fn()`` on a thread: its result, or the exception it raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def outcome(self, timeout: float = 120):
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


def wait_until_done(store, version: str, n: int, runner: Background) -> None:
    deadline = time.monotonic() + 60
    while stale(store, version) > 400 - n:
        assert time.monotonic() < deadline and runner.is_alive(), runner.error
        time.sleep(0.05)


def test_a_worker_killed_mid_refresh_leaves_every_twin_on_the_champion_once(
        twins, registry, cluster):
    store = twins
    model = adopt_champion(store, ModelSource(registry, "eskd"), "test")
    slow = target(store, registry, model.version, chunk=16,
                  failpoints=frozenset({"slow_refresh"}))
    runner = Background(lambda: refresh_twins(slow, cluster, per_task=64, lease_seconds=10))
    wait_until_done(store, model.version, 48, runner)  # a few transactions in, most ahead
    busy = [w for w, keys in cluster.processing().items() if keys]
    assert busy
    os.kill(cluster.run(os.getpid)[busy[0]], signal.SIGKILL)  # a worker amid its task
    result = runner.outcome()
    assert stale(store, model.version) == 0
    assert result.refreshed <= result.total == 400  # a dead worker's writes: not reported
    job = store.jobs.get(result.job)
    assert job.state == RefreshState.DONE and job.verified and job.attempts == 1
    per_twin = refresh_forecasts(store, model.version)
    assert len(per_twin) == 400 and set(per_twin.values()) == {1}
    assert {f.model_version for f in latest(store).values()} == {model.version}
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
    assert len(cluster.run(os.getpid)) == 2


def test_a_lost_lease_stops_the_run_and_exits_with_an_error(twins, registry, cluster):
    """Another runner takes the job over (this one's lease ran out): no more tasks."""
    store = twins
    model = adopt_champion(store, ModelSource(registry, "eskd"), "test")
    slow = target(store, registry, model.version, chunk=16,
                  failpoints=frozenset({"slow_refresh"}))
    runner = Background(lambda: refresh_twins(slow, cluster, per_task=32, lease_seconds=3))
    wait_until_done(store, model.version, 32, runner)
    job = store.jobs.latest(NAME)
    with store.write() as s:  # claimed as if this runner had stalled past its lease
        s.execute(update(RefreshJob).where(RefreshJob.id == job.id).values(
            worker="svc-host:7", attempts=RefreshJob.attempts + 1,
            lease_expires_at=utcnow() + timedelta(seconds=60)))
    with pytest.raises(LeaseLost, match=r"taken over .* svc-host:7"):
        runner.outcome(30)
    assert 0 < _settle(store, model.version) < 400  # stopped, not finished
    held = store.jobs.get(job.id)
    assert held.state == RefreshState.RUNNING and held.worker == "svc-host:7"


def _cli(database: str, registry: Tracker, home: Path, *args: str,
         slow: bool = True) -> subprocess.Popen:
    """``twincast refresh`` (3 s lease, 16-twin transactions)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWINCAST_", "MLFLOW_T"))}
    env.update({"TWINCAST_HOME": str(home), "TWINCAST_DATABASE_URL": database,
                "TWINCAST_MLFLOW_URI": registry.tracking_uri, "TWINCAST_TASK": "eskd",
                "TWINCAST_REFRESH_LEASE_SECONDS": "3", "TWINCAST_REFRESH_CHUNK": "16",
                "TWINCAST_FAILPOINTS": "slow_refresh" if slow else "",
                "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true"})
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "twincast"), "refresh", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_command_refuses_a_live_lease_with_status_3(registry, tmp_path):
    database = f"sqlite:///{tmp_path / 'twins.db'}"
    store = open_store(database)
    model = adopt_champion(store, ModelSource(registry, "eskd"), "test")  # makes the job
    assert store.jobs.claim(NAME, model.version, "svc-host:4242", 60) is not None
    proc = _cli(database, registry, tmp_path, "--scheduler", "local:2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and out == "", err
    assert "refused" in err and "svc-host:4242" in err and "not running beside it" in err
    job = store.jobs.latest(NAME)
    assert job.state == RefreshState.RUNNING and job.worker == "svc-host:4242"
    store.dispose()


def test_a_killed_client_is_refused_until_its_lease_expires_then_resumed(
        twins, registry, database, cluster, tmp_path):
    """The command on an existing cluster (tcp://…), killed: the cluster's workers finish
    the transactions they are in, the lease holds the job until it runs out, and a
    second run re-forecasts only the twins still stale."""
    store = twins
    version = promote_copy(registry)
    address = cluster.scheduler.address
    proc = _cli(database, registry, tmp_path, "--scheduler", address, "--chunk", "64")
    try:
        deadline = time.monotonic() + 90
        while stale(store, version) > 400 - 48:  # a few transactions in, most ahead
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
        worker = f"dask:{os.uname().nodename}:{proc.pid}"
        assert worker in holder(store, NAME, version)  # the dead client's lease
        job = store.jobs.latest(NAME)
        assert job.state == RefreshState.RUNNING and job.worker == worker
        left = _settle(store, version)  # tasks running when it died finish theirs
        assert 0 < left < 400
        deadline = time.monotonic() + 10
        while holder(store, NAME, version) is not None:  # the 3 s lease runs out
            assert time.monotonic() < deadline
            time.sleep(0.1)
        again = _cli(database, registry, tmp_path, "--scheduler", address, slow=False)
        out, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        refreshed = re.search(r"refreshed ([\d,]+) twins .* \(([\d,]+) twins/s", out)
        assert int(refreshed.group(1).replace(",", "")) == left  # only the stale ones
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stale(store, version) == 0
    job = store.jobs.get(job.id)
    assert job.state == RefreshState.DONE and job.verified and job.attempts == 2
    assert job.worker.startswith("dask:") and job.worker != worker
    per_twin = refresh_forecasts(store, version)
    assert len(per_twin) == 400 and set(per_twin.values()) == {1}


def _settle(store, version: str, quiet: float = 1.0) -> int:
    """The stale count once nothing has changed it for ``quiet`` seconds."""
    last, since = stale(store, version), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = stale(store, version)
        if now != last:
            last, since = now, time.monotonic()
    return last
