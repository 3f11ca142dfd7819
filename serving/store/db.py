"""Engines, migrations and per-twin write locks for SQLite and PostgreSQL.

A write for one twin is one transaction under that twin's lock: ``SELECT … FOR UPDATE``
on its row in PostgreSQL, ``BEGIN IMMEDIATE`` (one writer at a time) in SQLite.  The
forecast is computed inside that transaction, so a failed request leaves nothing behind
and concurrent requests lose nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
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
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if _immediate.get() else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


_sqlite_writer = threading.Lock()


@contextlib.contextmanager
def write_transaction(factory: sessionmaker, *, sqlite: bool = False) -> Iterator[Session]:
    """A session whose transaction holds the database's write lock from its first
    statement on SQLite (no other writer can interleave); commits or rolls back.

    On SQLite, threads of one process also queue on a lock first: SQLite's own busy
    handler retries with sleeps of up to 100 ms, which starves unlucky writers.
    """
    if sqlite:
        with _sqlite_writer, write_transaction(factory) as session:
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
