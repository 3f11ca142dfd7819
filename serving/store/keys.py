"""API keys: created once, stored hashed, looked up on every request (one indexed read),
so a revoked key stops working at once in every worker."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError

from serving.errors import Conflict, NotFound
from serving.states import Role
from serving.store.db import Database
from serving.store.models import ApiKey
from serving.store.twins import utcnow

KEY_PREFIX = "tc_"


def hash_key(token: str) -> str:
    # keys are 256-bit random tokens: a plain SHA-256 is a safe, fast lookup hash
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    """What a request knows of its key (never the secret)."""

    id: int | None
    name: str
    role: str


class Keys:
    def __init__(self, db: Database):
        self.db = db
        self._active = select(ApiKey.id, ApiKey.name, ApiKey.role).where(
            ApiKey.key_hash == bindparam("h"), ApiKey.revoked_at.is_(None))  # built once

    def create(self, name: str, role: str) -> str:
        """Create an API key; the secret is returned once and only its hash is stored."""
        try:
            role = Role(role).value
        except ValueError:
            raise ValueError(f"role must be one of {[r.value for r in Role]}, "
                             f"got {role!r}") from None
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.db.write() as s:
                s.add(ApiKey(name=name, role=role, key_hash=hash_key(token),
                             prefix=token[:10], created_at=utcnow()))
        except IntegrityError:
            raise Conflict(f"an API key named {name!r} exists already") from None
        return token

    def list(self) -> list[ApiKey]:
        with self.db.read() as s:
            return list(s.execute(select(ApiKey).order_by(ApiKey.id)).scalars())

    def revoke(self, name: str) -> None:
        with self.db.write() as s:
            done = s.execute(update(ApiKey).where(ApiKey.name == name,
                                                  ApiKey.revoked_at.is_(None))
                             .values(revoked_at=utcnow())).rowcount
        if not done:
            raise NotFound(f"no active API key named {name!r}")

    def authenticate(self, token: str) -> KeyInfo | None:
        """The active key for a token (None: unknown or revoked), read from the store
        each time: no worker keeps accepting a key another one revoked."""
        if len(token) > 200:  # keys are 46 characters: no hashing of arbitrary lengths
            return None
        with self.db.engine.connect() as conn:  # one read: no ORM session needed
            row = conn.execute(self._active, {"h": hash_key(token)}).first()
        return None if row is None else KeyInfo(int(row[0]), row[1], row[2])
