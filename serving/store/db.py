"""Engines, migrations and write transactions for SQLite and PostgreSQL.

A write is one transaction under its twins' locks: ``SELECT … FOR NO KEY UPDATE`` on
their rows in PostgreSQL (in sorted order), ``BEGIN IMMEDIATE`` (one writer at a time)
in SQLite.  The forecast is computed inside that transaction, so a failed request
leaves nothing behind and concurrent requests lose nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import random
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from serving.errors import Unavailable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
WRITE_WAIT_SECONDS = 10.0  # a clinical write waits this long for SQLite's lock, then 503
_immediate: contextvars.ContextVar[bool] = contextvars.ContextVar("immediate", default=False)


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (the driver twincast depends on)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://"):]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a database error's text never carries patient values into logs
        engine = create_engine(url, connect_args={"timeout": WRITE_WAIT_SECONDS,
                                                   "check_same_thread": False},
                               hide_parameters=True, json_serializer=json_text)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(WRITE_WAIT_SECONDS * 1000)}")
            # no checkpoint inside a request's commit: the Checkpointer runs them
            cur.execute("PRAGMA wal_autocheckpoint=0")
            # a twin's history is a few hundred rows spread over the file: keep pages in
            # memory (64 MiB per connection).  No memory map: with WAL it reads no faster
            # here (a history 0.062 vs 0.060 ms), while every write transaction pays for
            # it (BEGIN IMMEDIATE 0.15 vs 0.05 ms, a one-row event insert 0.11 vs
            # 0.07 ms: the map follows the file as checkpoints grow it)
            cur.execute("PRAGMA cache_size=-65536")
            cur.execute("PRAGMA mmap_size=0")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if _immediate.get() else "BEGIN")

        return engine
    # JIT off: it compiles queries whose estimated cost looks high (a twin's history with
    # stale statistics) for milliseconds, on a service whose queries take microseconds
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                         hide_parameters=True, json_serializer=json_text,
                         connect_args={"options": "-c jit=off"})


def json_text(value) -> str:
    """JSON columns' text (orjson; the standard library's parser reads it back).  Plain
    Python values only — what the tamper-evidence digests hash — and never NaN: what
    orjson refuses goes to the standard library, which refuses non-finite numbers."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, allow_nan=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class WriterQueue:
    """One SQLite writer at a time within a process, urgent writers (clinical requests)
    first: SQLite's own busy handler retries with sleeps of up to 100 ms, which starves
    unlucky writers, and a background refresh must yield to clinical traffic.  An urgent
    writer waits at most ``WRITE_WAIT_SECONDS`` (then :class:`~serving.errors.Unavailable`,
    a 503 with ``Retry-After``); background writers wait for their turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._urgent_waiting = 0

    @contextlib.contextmanager
    def hold(self, *, urgent: bool = True) -> Iterator[None]:
        deadline = time.monotonic() + WRITE_WAIT_SECONDS
        with self._cond:
            if urgent:
                self._urgent_waiting += 1
            try:
                while self._held or (not urgent and self._urgent_waiting):
                    left = deadline - time.monotonic()
                    if urgent and left <= 0:
                        raise Unavailable("the database is busy: try again shortly")
                    self._cond.wait(left if urgent else None)
            finally:
                if urgent:
                    self._urgent_waiting -= 1
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


_queues: dict[str, WriterQueue] = {}
_queues_lock = threading.Lock()


def writer_queue(engine: Engine) -> WriterQueue:
    """The process-wide writer queue of one database."""
    key = engine.url.render_as_string(hide_password=True)
    with _queues_lock:
        return _queues.setdefault(key, WriterQueue())


@contextlib.contextmanager
def write_transaction(factory: sessionmaker, *, queue: WriterQueue | None = None,
                      urgent: bool = True) -> Iterator[Session]:
    """A session whose transaction holds the database's write lock from its first
    statement on SQLite (``queue`` given: no other writer can interleave); commits or
    rolls back."""
    if queue is not None:
        with queue.hold(urgent=urgent), write_transaction(factory) as session:
            yield session
        return
    token = _immediate.set(True)
    try:
        with factory() as session, session.begin():
            session.connection()  # BEGIN IMMEDIATE now, while the flag is set
            _immediate.reset(token)
            token = None
            yield session
    finally:
        if token is not None:
            _immediate.reset(token)


RETRYABLE_SQLSTATES = {"40P01", "40001", "55P03"}  # deadlock, serialization, lock timeout


def is_retryable(exc: BaseException) -> bool:
    """A transaction that may succeed when simply run again (deadlock, busy database)."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(orig) or "database is busy" in str(orig)


def is_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached or is shutting down (answer 503, not 500)."""
    return isinstance(exc, OperationalError) and not is_retryable(exc)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine, lock_dir: Path | None) -> Iterator[None]:
    """Only one process migrates at a time (workers start together)."""
    if is_sqlite(engine):
        path = Path(engine.url.database or "twincast.db")
        lock = (lock_dir or path.parent) / f".{path.name}.migrate.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    key = zlib.crc32(b"twincast-migrations")
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def upgrade(engine: Engine, lock_dir: Path | None = None) -> str:
    """Apply every Alembic migration (idempotent, safe with concurrent callers)."""
    cfg = _alembic_config(engine)
    with _migration_lock(engine, lock_dir):
        if current_revision(engine) != head_revision():
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    return current_revision(engine)


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


class Checkpointer:
    """SQLite's WAL checkpoints off the request path: a commit that crossed the
    auto-checkpoint threshold would copy the log into the database (and sync) while its
    request waits — the periodic ~50-100 ms stalls of a busy writer.  One thread per
    database file and process checkpoints every ``every`` seconds instead (PASSIVE: it
    never blocks readers or writers; TRUNCATE when the log has grown past ``max_pages``
    and that pass copied all of it)."""

    def __init__(self, engine: Engine, every: float = 1.0, max_pages: int = 100_000):
        self.engine, self.every, self.max_pages = engine, every, max_pages
        threading.Thread(target=self._loop, name="sqlite-checkpoint", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                with self.engine.connect() as conn:
                    busy, log, done = conn.exec_driver_sql(
                        "PRAGMA wal_checkpoint(PASSIVE)").one()
                    # truncate only a log already copied in full: writers then wait for
                    # the truncation alone (0.15 s for a 380 MB log here), not the copy
                    if not busy and log > self.max_pages and done == log:
                        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            except Exception:  # a busy or closed database: try again next time
                continue


_checkpointers: dict[str, Checkpointer] = {}


def checkpointer(engine: Engine) -> Checkpointer:
    key = engine.url.render_as_string(hide_password=True)
    with _queues_lock:
        if key not in _checkpointers:
            _checkpointers[key] = Checkpointer(engine)
        return _checkpointers[key]


class Database:
    """An engine, its sessions and its write transactions (with retries)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.sqlite = is_sqlite(self.engine)
        self.queue = writer_queue(self.engine) if self.sqlite else None
        if self.sqlite and self.engine.url.database not in (None, "", ":memory:"):
            checkpointer(self.engine)

    def write(self, *, urgent: bool = True):
        """A write transaction (commit on success, roll back on any error)."""
        return write_transaction(self.sessions, queue=self.queue, urgent=urgent)

    def read(self) -> Session:
        return self.sessions()

    def transact(self, work, *, urgent: bool = True, attempts: int = 4):
        """Run ``work(session)`` in one write transaction; a deadlock or a serialisation
        failure runs it again (up to ``attempts`` times), then raises
        :class:`Unavailable`.  A SQLite database still locked after its busy timeout is
        not tried again: that timeout was the bounded wait."""
        for attempt in range(attempts):
            try:
                with self.write(urgent=urgent) as s:
                    return work(s)
            except DBAPIError as exc:
                again = is_retryable(exc) and not (self.sqlite and urgent)
                if again and attempt + 1 < attempts:
                    time.sleep(0.01 * (attempt + 1) * (1 + random.random()))
                    continue
                if is_retryable(exc) or is_unavailable(exc):
                    raise Unavailable("the database is busy or unreachable: try again "
                                      "shortly") from None
                raise
        raise AssertionError("unreachable")

    def analyze(self) -> None:
        """Fresh planner statistics after a bulk change (PostgreSQL: autovacuum may be off
        or not have got there yet).  On SQLite a bounded sample (``analysis_limit``, as
        SQLite recommends): ~0.2 s of write lock on a 3 GB store instead of seconds."""
        with self.engine.connect() as conn:
            if self.sqlite:
                conn.exec_driver_sql("PRAGMA analysis_limit=400")
            conn.exec_driver_sql("ANALYZE")
            conn.commit()

    def dispose(self) -> None:
        self.engine.dispose()
