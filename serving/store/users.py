"""People who sign in to the care-team pages, and their sessions.

Passwords are hashed with argon2 (``argon2-cffi``'s defaults, RFC 9106's low-memory
profile); a wrong name costs the same hash as a wrong password, so sign-in does not
tell which names exist.  A session is a random token in an HttpOnly cookie, stored as
its SHA-256; it ends at its expiry, at sign-out, or when its account is disabled — each
request reads the account again, so a disabled person is out at once in every worker.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from serving.errors import Conflict, NotFound
from serving.states import Role
from serving.store.db import Database
from serving.store.models import UiSession, User
from serving.store.twins import utcnow

log = logging.getLogger("twincast.users")
MIN_PASSWORD = 12
SEEN_EVERY_SECONDS = 60  # how often a session's last use is written (the idle timeout's)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_hasher = PasswordHasher()
_DUMMY = _hasher.hash("not a password of anyone's")  # for names that do not exist


@dataclass(frozen=True)
class Person:
    """A signed-in person as a request knows them (never the password or token)."""

    id: int
    name: str
    role: str
    session_id: int
    csrf: str  # the session's form token


def csrf_token(token: str) -> str:
    """The form token of a session: derived from its secret, so nothing more is stored."""
    return hmac.new(token.encode(), b"twincast-csrf", hashlib.sha256).hexdigest()


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(self, db: Database):
        self.db = db

    def create(self, name: str, role: str, password: str) -> int:
        import re

        if not re.match(NAME_PATTERN, name):
            raise ValueError("a user name has 1 to 64 letters, digits or . _ @ -, starting "
                             "with a letter or digit")
        try:
            role = Role(role).value
        except ValueError:
            raise ValueError(f"role must be one of {[r.value for r in Role]}, "
                             f"got {role!r}") from None
        check_password(password)
        try:
            with self.db.write() as s:
                user = User(name=name, role=role, password_hash=_hasher.hash(password),
                            created_at=utcnow())
                s.add(user)
                s.flush()
                return int(user.id)
        except IntegrityError:
            raise Conflict(f"a user named {name!r} exists already") from None

    def list(self) -> list[User]:
        with self.db.read() as s:
            return list(s.execute(select(User).order_by(User.id)).scalars())

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (every open session ends: enabling again does not bring them back)
        or enable an account."""
        now = utcnow()
        with self.db.write() as s:
            user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
            if user is None:
                raise NotFound(f"no user named {name!r}")
            user.disabled_at = now if disabled else None
            if disabled:
                s.execute(update(UiSession).where(UiSession.user_id == user.id,
                                                  UiSession.ended_at.is_(None))
                          .values(ended_at=now))

    def set_password(self, name: str, password: str) -> None:
        """A new password; the person's open sessions end."""
        check_password(password)
        now = utcnow()
        with self.db.write() as s:
            user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
            if user is None:
                raise NotFound(f"no user named {name!r}")
            user.password_hash = _hasher.hash(password)
            s.execute(update(UiSession).where(UiSession.user_id == user.id,
                                              UiSession.ended_at.is_(None))
                      .values(ended_at=now))

    # ------------------------------------------------------------------ sessions
    def sign_in(self, name: str, password: str, minutes: float) -> tuple[str, Person] | None:
        """A new session for the right name and password of an enabled account (None
        otherwise, whichever was wrong): its cookie token and the person."""
        if "\x00" in name:  # no name holds one (and PostgreSQL refuses it in a query)
            name = ""
        with self.db.read() as s:
            user = s.execute(select(User).where(User.name == name[:255])).scalar_one_or_none()
        try:
            _hasher.verify(user.password_hash if user else _DUMMY, password[:1024])
        except (VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled_at is not None:
            return None
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with self.db.write() as s:
            row = UiSession(token_hash=_hash_token(token), user_id=user.id, created_at=now,
                            expires_at=now + timedelta(minutes=minutes), last_seen_at=now)
            s.add(row)
            if _hasher.check_needs_rehash(user.password_hash):
                s.execute(update(User).where(User.id == user.id)
                          .values(password_hash=_hasher.hash(password)))
            s.flush()
            sid = int(row.id)
        return token, Person(int(user.id), user.name, user.role, sid, csrf_token(token))

    def session(self, token: str, idle_minutes: float = 30.0, now: datetime | None = None
                ) -> Person | None:
        """The person behind a cookie token: a live session (not past its expiry, used
        within ``idle_minutes``, not ended) of an enabled account."""
        if not token or len(token) > 200:
            return None
        now = now or utcnow()
        with self.db.read() as s:
            row = s.execute(
                select(UiSession.id, User.id, User.name, User.role, UiSession.last_seen_at)
                .join(User, User.id == UiSession.user_id)
                .where(UiSession.token_hash == _hash_token(token), UiSession.ended_at.is_(None),
                       UiSession.expires_at > now,
                       UiSession.last_seen_at > now - timedelta(minutes=idle_minutes),
                       User.disabled_at.is_(None))).first()
        if row is None:
            return None
        every = min(SEEN_EVERY_SECONDS, idle_minutes * 30)  # well inside the timeout
        if row[4] < now - timedelta(seconds=every):
            try:
                with self.db.write(urgent=False) as s:
                    s.execute(update(UiSession).where(UiSession.id == row[0])
                              .values(last_seen_at=now))
            except Exception as exc:  # the page still shows; the next use writes it
                log.warning("a session's last use was not written (%s)", type(exc).__name__)
        return Person(int(row[1]), row[2], row[3], int(row[0]), csrf_token(token))

    def sign_out(self, session_id: int) -> None:
        with self.db.write() as s:
            s.execute(update(UiSession).where(UiSession.id == session_id,
                                              UiSession.ended_at.is_(None))
                      .values(ended_at=utcnow()))


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password has at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise ValueError("a password has at most 1024 characters")
