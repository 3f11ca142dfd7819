"""Re-forecasting every twin whose forecast is not the served version's.

A job is claimed under a lease that the runner extends after every chunk; a worker that
dies stops extending it and another worker takes the job over.  The runner walks the
stale twins in ascending id order (so it resumes where any earlier runner stopped: a
twin already on the target version is not stale), writes each chunk through
:meth:`TwinWriter.refresh`, yields to clinical writers between chunks, and ends with a
verification pass: the job is done only when no twin is stale.
"""

from __future__ import annotations

import logging
import threading
import time

from serving.model_source import LoadedModel
from serving.states import RefreshState
from serving.store import Store
from serving.writes import TwinWriter

log = logging.getLogger("twincast.refresh")
MAX_PASSES = 5
MIN_CHUNK = 16
TRAFFIC_WINDOW = 0.25  # seconds since the last clinical write that count as "busy"


class Refresher:
    def __init__(self, store: Store, writer: TwinWriter, worker: str, *, chunk: int = 256,
                 lease_seconds: float = 30.0, failpoints: frozenset[str] = frozenset()):
        self.store = store
        self.writer = writer
        self.worker = worker
        self.chunk = chunk
        self.lease_seconds = lease_seconds
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # tests: a refresh slow enough to kill its worker in the middle
        self._pause = 0.25 if "slow_refresh" in failpoints else 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def try_claim(self, model: LoadedModel) -> bool:
        """Claim the served version's active job if nobody holds it; run it in the
        background.  True when a run started."""
        if self.running:
            return False
        job = self.store.jobs.claim(model.name, model.version, self.worker, self.lease_seconds)
        if job is None:
            return False
        self._thread = threading.Thread(target=self.run, args=(job, model), daemon=True,
                                        name=f"refresh-{job}")
        self._thread.start()
        return True

    def run(self, job: int, model: LoadedModel) -> None:
        jobs, twins = self.store.jobs, self.store.twins
        try:
            self.store.db.analyze()  # a refresh follows bulk changes: fresh statistics
            with self.store.read() as s:
                total = twins.count_stale(s, model.name, model.version)
            if not jobs.heartbeat(job, self.worker, self.lease_seconds, total=total):
                return
            done, spent = 0, 0.0
            for _ in range(MAX_PASSES):
                last = -1
                while not self._stop.is_set():
                    busy = self._yield(spent)
                    size = max(MIN_CHUNK, self.chunk // 8) if busy else self.chunk
                    with self.store.read() as s:
                        ids = twins.stale(s, model.name, model.version, last, size)
                    if not ids:
                        break
                    if self._pause:
                        time.sleep(self._pause)
                    t0 = time.monotonic()
                    done += self.writer.refresh(ids, model)
                    spent = time.monotonic() - t0
                    last = ids[-1]
                    if not jobs.heartbeat(job, self.worker, self.lease_seconds, done=done):
                        log.info("refresh %s: superseded or taken over", job)
                        return
                if self._stop.is_set():
                    return
                with self.store.read() as s:
                    left = twins.count_stale(s, model.name, model.version)
                if left == 0:
                    jobs.finish(job, self.worker, RefreshState.DONE, verified=True, done=done)
                    log.info("refresh %s: %d twins on version %s, verified", job, done,
                             model.version)
                    return
            jobs.finish(job, self.worker, RefreshState.FAILED, done=done,
                        error=f"{left} twins still stale after {MAX_PASSES} passes")
        except Exception as exc:
            log.error("refresh %s failed: %s", job, type(exc).__name__)
            try:
                jobs.finish(job, self.worker, RefreshState.FAILED, error=type(exc).__name__)
            except Exception as again:  # the store itself is gone: the lease will expire
                log.error("refresh %s: could not record the failure (%s)", job,
                          type(again).__name__)

    def _yield(self, spent: float) -> bool:
        """Give way to clinical writes of this process: while they arrive, wait for the
        ones in flight and rest as long as the last chunk took (at most half the CPU),
        and take smaller chunks (True).  The database's own locks order writers across
        processes; SQLite's writer queue also puts clinical writers first."""
        activity = self.writer.activity
        if not activity.busy(TRAFFIC_WINDOW):
            return False
        deadline = time.monotonic() + 0.5
        while activity.inflight and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(min(spent, 0.1))
        return True
