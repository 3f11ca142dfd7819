"""Service state: the served model version, and the refresh jobs with their leases.

Whichever worker notices a new champion (or a roll-back) moves the served-version row and
creates a refresh job in the same transaction.  Any worker may claim a job — a pending
one, a running one whose lease expired (its worker died), or a failed one after a
back-off — by one conditional ``UPDATE``, so exactly one runs it at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from serving.states import ACTIVE, RefreshState, can_move
from serving.store.db import Database
from serving.store.models import ModelLoad, RefreshJob, ServedModel
from serving.store.twins import Twins, utcnow

MAX_ATTEMPTS = 5
RETRY_AFTER = timedelta(seconds=30)


class AliasMoved(Exception):
    """The champion alias moved between a worker's read of it and its adoption."""

    def __init__(self, version: str | None):
        super().__init__(version)
        self.version = version


class Jobs:
    def __init__(self, db: Database, twins: Twins):
        self.db = db
        self.twins = twins
        self._insert = sqlite_insert if db.sqlite else pg_insert
        served = select(ServedModel.model_version).where(
            ServedModel.model_name == bindparam("name"))
        self._served = {False: served,  # built once: every write asks
                        True: served if db.sqlite else served.with_for_update(read=True)}

    # ------------------------------------------------------------------ served version
    def served_version(self, s: Session, name: str, *, lock: bool = False) -> str | None:
        """The served version; ``lock``: held (FOR SHARE on PostgreSQL) until the caller's
        transaction ends, so a version change waits for writes that checked it."""
        return s.connection().execute(self._served[lock], {"name": name}).scalar_one_or_none()

    def adopt(self, name: str, version: str, run_id: str, worker: str, reason: str,
              confirm: Callable[[], str | None] | None = None) -> int | None:
        """Make ``version`` the served one; when that changes it, supersede the running
        refresh and create a new one (returned).  Idempotent for the same version.

        ``confirm`` reads the alias again once the served row is locked: a worker whose
        alias read went stale while it waited for the lock (another worker meanwhile
        adopted a newer move) raises :class:`AliasMoved` instead of moving the row back."""
        def work(s: Session) -> int | None:
            now = utcnow()
            s.add(ModelLoad(time=now, model_name=name, model_version=version,
                            run_id=run_id, worker=worker, reason=reason[:255]))
            values = {"model_name": name, "model_version": version, "run_id": run_id,
                      "changed_at": now, "changed_by": worker[:128], "reason": reason[:255]}
            inserted = s.execute(self._insert(ServedModel).values(**values)
                                 .on_conflict_do_nothing(index_elements=["model_name"])
                                 .returning(ServedModel.model_name)).first()
            if inserted is None:
                q = select(ServedModel.model_version).where(ServedModel.model_name == name)
                if not self.db.sqlite:
                    q = q.with_for_update()
                current = s.execute(q).scalar_one()
                if current == version:
                    return None
                if confirm is not None and (seen := confirm()) != version:
                    raise AliasMoved(seen)
                s.execute(update(ServedModel).where(ServedModel.model_name == name)
                          .values(**values))
            s.execute(update(RefreshJob).where(
                RefreshJob.model_name == name,
                RefreshJob.state.in_([str(x) for x in ACTIVE])).values(
                state=str(RefreshState.SUPERSEDED), finished_at=now))
            job = RefreshJob(model_name=name, model_version=version,
                             state=str(RefreshState.PENDING), total=0, done=0,
                             created_at=now, attempts=0)
            s.add(job)
            s.flush()
            return int(job.id)
        return self.db.transact(work, urgent=False)

    # ------------------------------------------------------------------ refresh jobs
    def ensure_job(self, name: str, version: str) -> int | None:
        """A pending job for twins that no job will reach (e.g. imported ones): created
        only when the served version is ``version``, no job is live and a twin is stale.
        The checks are reads (no write lock while polling); the job is made in a short
        write transaction that checks again."""
        with self.db.read() as s:
            if (self.served_version(s, name) != version or self._live_job(s, name, version)
                    or not self.twins.any_stale(s, version)):
                return None

        def work(s: Session) -> int | None:
            if self.served_version(s, name) != version or self._live_job(s, name, version):
                return None
            job = RefreshJob(model_name=name, model_version=version,
                             state=str(RefreshState.PENDING), total=0, done=0,
                             created_at=utcnow(), attempts=0)
            s.add(job)
            s.flush()
            return int(job.id)
        return self.db.transact(work, urgent=False)

    def _live_job(self, s: Session, name: str, version: str) -> int | None:
        return s.execute(select(RefreshJob.id).where(
            RefreshJob.model_name == name, RefreshJob.model_version == version, _live()
        ).order_by(RefreshJob.id.desc()).limit(1)).scalar_one_or_none()

    def claim(self, name: str, version: str, worker: str, lease_seconds: float
              ) -> int | None:
        """Take the active job for ``version`` if nobody holds it; its id, or None."""
        now = utcnow()
        with self.db.read() as s:
            job = self._live_job(s, name, version)
        if job is None:
            return None
        free = or_(RefreshJob.state == str(RefreshState.PENDING),
                   and_(RefreshJob.state == str(RefreshState.RUNNING),
                        RefreshJob.lease_expires_at < now),
                   and_(RefreshJob.state == str(RefreshState.FAILED),
                        RefreshJob.attempts < MAX_ATTEMPTS,
                        RefreshJob.finished_at < now - RETRY_AFTER))

        def work(s: Session) -> int:
            return s.execute(update(RefreshJob).where(RefreshJob.id == job, free).values(
                state=str(RefreshState.RUNNING), worker=worker[:128], heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=now, finished_at=None, error=None,
                attempts=RefreshJob.attempts + 1)).rowcount
        return job if self.db.transact(work, urgent=False) == 1 else None

    def heartbeat(self, job_id: int, worker: str, lease_seconds: float, *,
                  done: int | None = None, total: int | None = None) -> bool:
        """Extend the lease (and record progress); False when the job is no longer ours."""
        now = utcnow()
        values: dict = {"heartbeat_at": now,
                        "lease_expires_at": now + timedelta(seconds=lease_seconds)}
        if done is not None:
            values["done"] = done
        if total is not None:
            values["total"] = total
        return self._update_ours(job_id, worker, values)

    def finish(self, job_id: int, worker: str, state: RefreshState, *,
               error: str | None = None, verified: bool | None = None,
               done: int | None = None) -> bool:
        assert can_move(RefreshState.RUNNING, state), state
        values: dict = {"state": str(state), "finished_at": utcnow(), "error": error,
                        "lease_expires_at": None}
        if verified is not None:
            values["verified"] = verified
        if done is not None:
            values["done"] = done
        return self._update_ours(job_id, worker, values)

    def _update_ours(self, job_id: int, worker: str, values: dict) -> bool:
        """Update a job this worker runs; False when it is no longer (taken over or
        superseded)."""
        def work(s: Session) -> int:
            return s.execute(update(RefreshJob).where(
                RefreshJob.id == job_id, RefreshJob.worker == worker[:128],
                RefreshJob.state == str(RefreshState.RUNNING)).values(**values)).rowcount
        return self.db.transact(work, urgent=False) == 1

    def latest(self, name: str) -> RefreshJob | None:
        with self.db.read() as s:
            return s.execute(select(RefreshJob).where(RefreshJob.model_name == name)
                             .order_by(RefreshJob.id.desc()).limit(1)).scalar_one_or_none()

    def get(self, job_id: int) -> RefreshJob | None:
        with self.db.read() as s:
            return s.get(RefreshJob, job_id)


def _live():
    """Jobs that may still run: pending, running, or failed with attempts left (a job
    that failed ``MAX_ATTEMPTS`` times is over; the next poll starts a new one)."""
    return or_(RefreshJob.state.in_([str(RefreshState.PENDING), str(RefreshState.RUNNING)]),
               and_(RefreshJob.state == str(RefreshState.FAILED),
                    RefreshJob.attempts < MAX_ATTEMPTS))
