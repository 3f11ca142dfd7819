"""The access log: who read or wrote which twin, when, through which key.

Writes of twins add their rows in their own transaction; a successful read commits its
row before its answer is sent (:meth:`Access.write`); refusals are queued and written in
batches by one background thread (flushed within ``FLUSH_SECONDS`` and before the log is
read).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from serving.store.db import Database
from serving.store.models import AccessLog
from serving.store.twins import utcnow

FLUSH_SECONDS = 0.2
log = logging.getLogger("twincast.access")


def access_row(*, key_id: int | None, key_name: str | None, role: str | None, method: str,
               path: str, action: str, subject_id: int | None, status_code: int,
               user_id: int | None = None) -> dict[str, Any]:
    """One access-log row (names and roles, never a secret or a clinical value): a key's,
    or a signed-in person's (``user_id``, their name as ``key_name``)."""
    if key_name is not None:  # a NUL (which PostgreSQL refuses) would stall the batch
        key_name = key_name.replace("\x00", "")[:255]
    return {"time": utcnow(), "api_key_id": key_id, "key_name": key_name, "role": role,
            "user_id": user_id, "method": method, "path": path.replace("\x00", "")[:512],
            "action": action,
            "subject_id": subject_id, "status_code": status_code}


class Access:
    def __init__(self, db: Database):
        self.db = db
        self._queue: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._insert = insert(AccessLog.__table__)  # built once

    def add(self, s: Session, rows: list[dict[str, Any]]) -> None:
        """Append rows in the caller's transaction."""
        if rows:
            s.connection().execute(self._insert, rows)

    def write(self, row: dict[str, Any]) -> None:
        """Commit one row now (a request's answer waits for it)."""
        with self.db.write() as w:
            w.connection().execute(self._insert, [row])

    def queue(self, row: dict[str, Any]) -> None:
        """Append a row soon (batched), off the request's path."""
        with self._lock:
            self._queue.append(row)
            start = self._thread is None
            if start:
                self._thread = threading.Thread(target=self._loop, name="access-log",
                                                daemon=True)
        if start:
            self._thread.start()
            atexit.register(self.flush)

    def _loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:
                log.exception("access log flush failed")

    def flush(self) -> int:
        """Write every queued row in one transaction (kept for the next try on error)."""
        with self._flush_lock:
            with self._lock:
                rows, self._queue = self._queue, []
            if not rows:
                return 0
            try:
                with self.db.write(urgent=False) as w:
                    w.connection().execute(self._insert, rows)
            except Exception:
                with self._lock:
                    self._queue[:0] = rows
                raise
            return len(rows)

    def read(self, subject_id: int | None, limit: int) -> list[AccessLog]:
        self.flush()
        q = select(AccessLog).order_by(AccessLog.id.desc()).limit(limit)
        if subject_id is not None:
            q = q.where(AccessLog.subject_id == subject_id)
        with self.db.read() as s:
            return list(s.execute(q).scalars())
