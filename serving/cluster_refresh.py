"""The all-twin refresh after a new champion, on a Dask cluster (``twincast refresh``).

It runs the service's own refresh job under the service's lease: claimed by this client
(``dask:<host>:<pid>``; refused while the service or another runner holds it), extended
every few seconds while tasks run (lost: stop), and finished as the service's
:class:`~serving.refresh.Refresher` finishes it.  The client lists stale twins in
ascending id order one page at a time and submits one task per page — the id range
(previous page's last id, this page's last id] — with at most two tasks per worker in
flight, so it never holds every id.  A task, on a worker process, lists the twins of its
range that are stale *now* and writes them through :meth:`TwinWriter.refresh` in
transactions of the service's refresh chunk; it returns counts only.  Dask re-runs a
task whose worker died: the re-run finds the twins its first run wrote on the target
version already (and the writer, under the twins' locks, writes no twin already on it),
so a re-run writes nothing twice.  A verification pass ends it: the job is done only
when no twin is stale.

Workers open the store and load the model once per process (module-level cache), and
need the same database and MLflow store as the client (see :mod:`features.cluster`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_threads
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from features.cluster import worker_count
from serving.errors import Conflict, ServingError
from serving.model_source import LoadedModel, ModelSource
from serving.offline import go_offline
from serving.refresh import MAX_PASSES
from serving.served import ModelHolder
from serving.states import RefreshState
from serving.store import Store, open_store
from serving.store.db import worker_name
from serving.store.jobs import MAX_ATTEMPTS, RETRY_AFTER
from serving.store.models import RefreshJob
from serving.store.twins import utcnow
from serving.writes import TwinWriter
from training.registry import model_name
from training.tracking import Tracker

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("twincast.refresh")
PER_TASK = 1024  # stale twins per Dask task
# a task that raised (a busy database) runs again this often; one whose worker died is
# re-run by the scheduler anyway (up to ``distributed.scheduler.allowed-failures`` times)
TASK_RETRIES = 2
BEAT_SECONDS = 5.0  # the lease is extended this often (at most a third of it)
CACHED_TARGETS = 2  # (store, model) pairs a worker process keeps
SLOW_PAUSE = 0.25  # failpoint ``slow_refresh``: seconds before each transaction


class RefreshBusy(Conflict):
    """Another runner (the service, or another ``twincast refresh``) holds the job."""


class LeaseLost(Conflict):
    """The job was taken over or superseded while this runner ran it."""


class RefreshFailed(ServingError):
    """A task failed (after its retries), or twins stayed stale after every pass."""


@dataclass(frozen=True)
class Target:
    """What a task needs to rebuild its writer on a worker: plain values (pickled)."""

    database_url: str
    tracking_uri: str
    artifact_root: str | None
    task: str
    version: str
    chunk: int = 256  # twins per transaction: the service's ``refresh_chunk``
    failpoints: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return model_name(self.task)


@dataclass(frozen=True)
class ChunkDone:
    """A task's answer: counts only."""

    refreshed: int  # twins written
    stale: int  # stale twins the task found in its range
    seconds: float
    behind: bool = False  # the served version moved on: the job is superseded


@dataclass(frozen=True)
class RefreshResult:
    job: int | None  # None: no twin was stale
    version: str
    refreshed: int
    total: int  # stale twins when the run started
    passes: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.refreshed / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------ on a worker
_state: OrderedDict[tuple[str, str, str, str], tuple[Store, TwinWriter, LoadedModel]] = \
    OrderedDict()
_state_lock = threading.Lock()


def _writer(target: Target, model: LoadedModel | None = None
            ) -> tuple[Store, TwinWriter, LoadedModel]:
    """This process's store, writer and model for ``target``, made once (loading a model
    takes seconds); ``model`` given: use it rather than loading one."""
    key = (target.database_url, target.tracking_uri, target.name, target.version)
    with _state_lock:
        if key in _state and (model is None or model is _state[key][2]):
            _state.move_to_end(key)
            return _state[key]
        if key in _state:
            _state.pop(key)[0].dispose()
        go_offline(service=True)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        store = open_store(target.database_url, migrate=False)
        source = ModelSource(Tracker(target.tracking_uri, target.artifact_root), target.task)
        model = model or source.load(target.version)
        _state[key] = store, TwinWriter(store, ModelHolder(store, source, worker_name())), \
            model
        while len(_state) > CACHED_TARGETS:
            _, (old, _, _) = _state.popitem(last=False)
            old.dispose()
        return _state[key]


def refresh_range(target: Target, after: int, upto: int) -> ChunkDone:
    """Re-forecast the twins with ids in (``after``, ``upto``] that are stale now, in
    transactions of ``target.chunk`` twins (the task Dask runs, and may run again)."""
    store, writer, model = _writer(target)
    t0 = time.monotonic()
    written = seen = 0
    while True:
        with store.read() as s:
            ids = [i for i in store.twins.stale(s, model.name, model.version, after,
                                                target.chunk) if i <= upto]
        if not ids:
            break
        if "slow_refresh" in target.failpoints:
            time.sleep(SLOW_PAUSE)
        n = writer.refresh(ids, model)
        written += n
        seen += len(ids)
        if n == 0:
            with store.read() as s:
                served = store.jobs.served_version(s, model.name)
            if served != model.version:
                return ChunkDone(written, seen, time.monotonic() - t0, behind=True)
        after = ids[-1]
    return ChunkDone(written, seen, time.monotonic() - t0)


# ------------------------------------------------------------------ where tasks run
class _Pool:
    """Tasks on a Dask cluster (``client``), else on one thread of this process."""

    def __init__(self, client: Client | None):
        self.client = client
        if client is None:
            self._threads = ThreadPoolExecutor(1, thread_name_prefix="refresh")
            self.slots = 2
        else:
            self.slots = 2 * max(1, worker_count(client))

    def submit(self, *args: Any):
        if self.client is None:
            return self._threads.submit(refresh_range, *args)
        return self.client.submit(refresh_range, *args, pure=False, retries=TASK_RETRIES)

    def wait(self, futures: Collection, timeout: float) -> tuple[set, set]:
        """(done, not done), after the first is done or ``timeout`` seconds."""
        if not futures:
            return set(), set()
        if self.client is None:
            done, pending = wait_threads(futures, timeout, return_when=FIRST_COMPLETED)
            return set(done), set(pending)
        from distributed import wait

        try:
            done, pending = wait(list(futures), timeout=timeout, return_when=FIRST_COMPLETED)
        except TimeoutError:
            return set(), set(futures)
        return set(done), set(pending)

    def cancel(self, futures: Collection) -> None:
        """Drop queued tasks (a task already running finishes its transaction)."""
        if not futures:
            return
        if self.client is None:
            for f in futures:
                f.cancel()
        else:
            self.client.cancel(list(futures))

    def close(self) -> None:
        if self.client is None:
            self._threads.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------ on the client
def adopt_champion(store: Store, source: ModelSource, worker: str) -> LoadedModel:
    """Serve the ``champion`` alias's version, as a service worker that noticed the move
    would (a change creates the refresh job); the loaded model."""
    models = ModelHolder(store, source, worker)
    models.follow_champion("twincast refresh")
    return models.current()


def holder(store: Store, name: str, version: str) -> str | None:
    """Why the job for ``version`` cannot be claimed now (who holds its lease, or its
    back-off after a failure); None when it can, or when there is none."""
    job = store.jobs.latest(name)
    if job is None or job.model_version != version:
        return None
    now = utcnow()
    if job.state == RefreshState.RUNNING and job.lease_expires_at is not None \
            and job.lease_expires_at >= now:
        return (f"job {job.id} (refresh to {name} version {version}) is running on "
                f"{job.worker}; its lease runs until {job.lease_expires_at:%H:%M:%S} UTC")
    if job.state == RefreshState.FAILED and job.finished_at is not None \
            and job.attempts < MAX_ATTEMPTS and job.finished_at >= now - RETRY_AFTER:
        return (f"job {job.id} (refresh to {name} version {version}) failed at "
                f"{job.finished_at:%H:%M:%S} UTC ({job.error}); it may be retried "
                f"from {job.finished_at + RETRY_AFTER:%H:%M:%S} UTC")
    return None


def refresh_twins(target: Target, client: Client | None, *, worker: str | None = None,
                  lease_seconds: float = 30.0, per_task: int = PER_TASK,
                  model: LoadedModel | None = None,
                  progress: Callable[[int, int], None] | None = None) -> RefreshResult:
    """Run the refresh job for ``target.version`` (the served version) to the end.

    Parameters
    ----------
    target
        the store, the MLflow store, the task and version, the transaction size.
    client
        a Dask client (tasks on its workers), or None (one thread of this process).
    worker
        the lease holder's name (default ``dask:<host>:<pid>``).
    lease_seconds
        the lease (the service's ``refresh_lease_seconds``); extended every
        ``min(5, lease_seconds / 3)`` seconds.
    per_task
        stale twins per task.
    model
        ``target``'s model, already loaded (in-process runs use it).
    progress
        called with (twins refreshed, stale twins at the start) after each task.

    Raises :class:`RefreshBusy` (someone else holds the job), :class:`LeaseLost`,
    :class:`RefreshFailed`.
    """
    t0 = time.monotonic()
    worker = worker or f"dask:{worker_name()}"
    store = open_store(target.database_url, migrate=False)
    pool = None
    try:
        with store.read() as s:
            served = store.jobs.served_version(s, target.name)
        if served != target.version:
            raise RefreshFailed(f"{target.name} serves version {served}, not "
                                f"{target.version}: adopt the champion first")
        if client is None:  # this process's writer (the model loaded before the claim)
            _writer(target, model)
        job = _claim(store, target, worker, lease_seconds)
        if job is None:
            return RefreshResult(None, target.version, 0, 0, 0, time.monotonic() - t0)
        pool = _Pool(client)
        run = _Run(store, target, pool, job, worker, lease_seconds, per_task, progress)
        refreshed, total, passes = run.run()
        return RefreshResult(job, target.version, refreshed, total, passes,
                             time.monotonic() - t0)
    finally:
        if pool is not None:
            pool.close()
        store.dispose()


def _claim(store: Store, target: Target, worker: str, lease_seconds: float) -> int | None:
    """The job, claimed; None when no twin is stale.  Raises :class:`RefreshBusy`."""
    jobs = store.jobs
    for _ in range(3):
        jobs.ensure_job(target.name, target.version)  # stale twins no job will reach
        job = jobs.claim(target.name, target.version, worker, lease_seconds)
        if job is not None:
            return job
        why = holder(store, target.name, target.version)
        if why is not None:
            raise RefreshBusy(f"{why}: not running beside it")
        latest = jobs.latest(target.name)
        if latest is None or latest.model_version != target.version \
                or latest.state in (RefreshState.DONE, RefreshState.SUPERSEDED):
            with store.read() as s:
                if store.twins.count_stale(s, target.name, target.version) == 0:
                    return None
        # claimable a moment ago and taken, or a job made meanwhile: look again
    raise RefreshBusy(f"the refresh to {target.name} version {target.version} is being "
                      "claimed by another runner: try again shortly")


class _Run:
    """One claimed job: passes over the stale twins, the lease kept, then verified."""

    def __init__(self, store: Store, target: Target, pool: _Pool, job: int, worker: str,
                 lease_seconds: float, per_task: int,
                 progress: Callable[[int, int], None] | None):
        self.store, self.target, self.pool, self.job = store, target, pool, job
        self.worker, self.lease_seconds, self.per_task = worker, lease_seconds, per_task
        self.progress = progress
        self.beat = min(BEAT_SECONDS, lease_seconds / 3)
        self.next_beat = 0.0
        self.pending: set = set()
        self.done = self.total = 0

    def run(self) -> tuple[int, int, int]:
        jobs, twins, t = self.store.jobs, self.store.twins, self.target
        try:
            self.store.db.analyze()  # a refresh follows bulk changes: fresh statistics
            with self.store.read() as s:
                self.total = twins.count_stale(s, t.name, t.version)
            self._heartbeat(total=self.total)
            for passes in range(1, MAX_PASSES + 1):
                self._pass()
                with self.store.read() as s:
                    left = twins.count_stale(s, t.name, t.version)
                if left == 0:
                    jobs.finish(self.job, self.worker, RefreshState.DONE, verified=True,
                                done=self.done)
                    log.info("refresh %s: %d twins on version %s, verified", self.job,
                             self.done, t.version)
                    return self.done, self.total, passes
                log.info("refresh %s: %d twins still stale after pass %d", self.job, left,
                         passes)
            error = f"{left} twins still stale after {MAX_PASSES} passes"
            jobs.finish(self.job, self.worker, RefreshState.FAILED, done=self.done,
                        error=error)
            raise RefreshFailed(error)
        except (LeaseLost, RefreshFailed):
            self.pool.cancel(self.pending)
            raise
        except Exception as exc:
            self.pool.cancel(self.pending)
            self._fail(type(exc).__name__)
            raise RefreshFailed(f"refresh job {self.job} failed: {type(exc).__name__}: "
                                f"{exc}") from exc
        except BaseException:  # interrupted: let the next runner claim it at once
            self.pool.cancel(self.pending)
            self._release()
            raise

    def _pass(self) -> None:
        """Every twin stale now, in ascending id ranges of ``per_task`` stale twins."""
        t = self.target
        after, listed = -1, False
        while self.pending or not listed:
            while not listed and len(self.pending) < self.pool.slots:
                with self.store.read() as s:
                    ids = self.store.twins.stale(s, t.name, t.version, after, self.per_task)
                if not ids:
                    listed = True
                    break
                self.pending.add(self.pool.submit(t, after, ids[-1]))
                after = ids[-1]
            finished, self.pending = self.pool.wait(
                self.pending, max(0.0, self.next_beat - time.monotonic()))
            behind = False
            for f in finished:
                got: ChunkDone = f.result()  # a task's error, after its retries, ends here
                self.done += got.refreshed
                behind |= got.behind
                if self.progress is not None:
                    self.progress(self.done, self.total)
            if behind or time.monotonic() >= self.next_beat:
                self._heartbeat()

    def _heartbeat(self, **values: int) -> None:
        if not self.store.jobs.heartbeat(self.job, self.worker, self.lease_seconds,
                                         done=self.done, **values):
            job = self.store.jobs.get(self.job)
            raise LeaseLost(_lost(job, self.target))
        self.next_beat = time.monotonic() + self.beat

    def _fail(self, error: str) -> None:
        try:
            self.store.jobs.finish(self.job, self.worker, RefreshState.FAILED, done=self.done,
                                   error=error)
        except Exception as again:  # the store itself is gone: the lease will expire
            log.error("refresh %s: could not record the failure (%s)", self.job,
                      type(again).__name__)

    def _release(self) -> None:
        """End the lease now (the job stays running, claimable by anyone at once)."""
        with contextlib.suppress(Exception):  # else the lease expires by itself
            self.store.jobs.heartbeat(self.job, self.worker, 0, done=self.done)


def _lost(job: RefreshJob | None, target: Target) -> str:
    if job is None:
        return "the refresh job is gone: stopped"
    if job.state == RefreshState.SUPERSEDED:
        return (f"job {job.id} was superseded: {target.name} no longer serves version "
                f"{target.version}; stopped")
    return (f"job {job.id} was taken over (now {job.state} on {job.worker}): its lease ran "
            "out before this runner extended it; stopped")
