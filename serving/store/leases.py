"""Named leases: one holder at a time, taken by one atomic upsert, lost on expiry."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from serving.store.db import Database
from serving.store.models import Lease
from serving.store.twins import utcnow


class Leases:
    def __init__(self, db: Database):
        self.db = db
        self._insert = sqlite_insert if db.sqlite else pg_insert

    def take(self, name: str, holder: str, seconds: float) -> bool:
        """Take (or renew) ``name`` for ``seconds``; False while someone else holds it."""
        now = utcnow()
        ins = self._insert(Lease).values(name=name, holder=holder[:128],
                                         expires_at=now + timedelta(seconds=seconds))
        stmt = ins.on_conflict_do_update(
            index_elements=["name"],
            set_={"holder": ins.excluded.holder, "expires_at": ins.excluded.expires_at},
            where=(Lease.expires_at < now) | (Lease.holder == holder[:128]),
        ).returning(Lease.name)
        with self.db.write(urgent=False) as s:
            return s.execute(stmt).first() is not None

    def release(self, name: str, holder: str) -> None:
        with self.db.write(urgent=False) as s:
            s.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder[:128]))
