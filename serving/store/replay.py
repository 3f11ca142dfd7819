"""The CDS Hooks replay store: a token's (issuer, jti) is taken once, by one atomic
insert under its primary key, and kept until the token expires."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from serving.store.db import Database
from serving.store.models import CdsToken
from serving.store.twins import utcnow

PURGE_EVERY = 500  # takes between purges of expired rows


class Replay:
    def __init__(self, db: Database):
        self.db = db
        self._insert = sqlite_insert if db.sqlite else pg_insert
        self._takes = 0

    def take(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        """True the first time (issuer, jti) is seen, False for a replay (naive UTC)."""
        self._takes += 1
        purge = self._takes % PURGE_EVERY == 1
        with self.db.write() as s:
            if purge:
                s.execute(delete(CdsToken).where(CdsToken.expires_at < utcnow()))
            row = s.execute(self._insert(CdsToken).values(
                issuer=issuer[:512], jti=jti[:255], expires_at=expires_at)
                .on_conflict_do_nothing().returning(CdsToken.jti)).first()
        return row is not None
