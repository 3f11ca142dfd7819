"""API keys: created once, stored hashed, and never accepted once revoked, by any worker.

Most routes look the key up on every request (one indexed read).  The hot twin routes
(one twin's events, one twin's view) take the key as this worker last found it active
(:meth:`Keys.recall`) and confirm it in the transaction that acts for it
(:meth:`Keys.active`): a key revoked meanwhile makes that transaction write nothing and
the request a 401, so revocation is still at once everywhere, at no extra connection.  (On
PostgreSQL a revocation committed while such a transaction runs, after its check, lets
that one transaction finish: a window of one transaction, not of a cache's lifetime.)"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from serving.errors import Conflict, NotFound
from serving.states import Role
from serving.store.db import Database
from serving.store.models import ApiKey
from serving.store.twins import utcnow

KEY_PREFIX = "tc_"
REMEMBERED_KEYS = 1024  # per worker: keys found active, by hash (no secret is kept)
REVOKED = "unknown or revoked API key"


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
        self._live = select(ApiKey.id).where(ApiKey.id.in_(bindparam("ids", expanding=True)),
                                             ApiKey.revoked_at.is_(None))
        self._known: OrderedDict[str, KeyInfo] = OrderedDict()
        self._known_lock = threading.Lock()

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
        self._drop(lambda k: k.name == name)  # here; other workers confirm before acting

    def authenticate(self, token: str) -> KeyInfo | None:
        """The active key for a token (None: unknown or revoked), read from the store
        each time: no worker keeps accepting a key another one revoked."""
        if len(token) > 200:  # keys are 46 characters: no hashing of arbitrary lengths
            return None
        return self._lookup(hash_key(token))

    def _lookup(self, digest: str) -> KeyInfo | None:
        with self.db.engine.connect() as conn:  # one read: no ORM session needed
            row = conn.execute(self._active, {"h": digest}).first()
        return None if row is None else KeyInfo(int(row[0]), row[1], row[2])

    def recall(self, token: str) -> KeyInfo | None:
        """The active key for a token as this worker last found it (not read again), else
        as :meth:`authenticate` reads it.  Unconfirmed: whoever acts for it must check
        :meth:`active` in the transaction that acts (and :meth:`forget` it when not)."""
        if len(token) > 200:
            return None
        digest = hash_key(token)
        with self._known_lock:
            key = self._known.get(digest)
            if key is not None:
                self._known.move_to_end(digest)
                return key
        key = self._lookup(digest)
        if key is not None:
            with self._known_lock:
                self._known[digest] = key
                while len(self._known) > REMEMBERED_KEYS:
                    self._known.popitem(last=False)
        return key

    def active(self, s: Session, key_ids: Iterable[int]) -> set[int]:
        """Which of these keys are active, read in the caller's transaction."""
        ids = sorted(set(key_ids))
        # Core, not the session's ORM execution (a third of the cost on every write)
        return set(s.connection().execute(self._live, {"ids": ids}).scalars()) if ids \
            else set()

    def revoked_among(self, s: Session, key_ids: Iterable[int | None]) -> set[int]:
        """Which of these remembered keys are no longer active, read in the transaction
        that acts for them (and forgotten, so that their next request reads its key)."""
        ids = {k for k in key_ids if k is not None}
        gone = ids - self.active(s, ids) if ids else set()
        if gone:
            self.forget(gone)
        return gone

    def remembers(self, token: str) -> bool:
        """Whether this worker holds the token's key in memory (not read again)."""
        with self._known_lock:
            return hash_key(token) in self._known

    def is_active(self, key_id: int) -> bool:
        with self.db.read() as s:
            return bool(self.active(s, [key_id]))

    def forget(self, key_ids: Iterable[int]) -> None:
        """Recall these keys no more (found revoked): the next request reads its key."""
        gone = set(key_ids)
        self._drop(lambda k: k.id in gone)

    def _drop(self, which) -> None:
        with self._known_lock:
            for h in [h for h, k in self._known.items() if which(k)]:
                del self._known[h]
