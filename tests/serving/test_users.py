"""People's accounts and sessions against real databases: argon2 hashes, wrong names
and passwords alike, sessions that end at sign-out, a new password, disabling (for
good: enabling again does not revive them), their expiry and an idle timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from serving.errors import Conflict
from serving.store.models import User
from serving.store.twins import utcnow

PASSWORD = "a long enough password"


def test_accounts_are_hashed_and_checked(store):
    store.users.create("a.nurse", "clinical", PASSWORD)
    with store.read() as s:
        stored = s.execute(select(User.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    with pytest.raises(Conflict):
        store.users.create("a.nurse", "auditor", PASSWORD)
    for bad in (("x", "clinical", "short"), ("x y", "clinical", PASSWORD),
                ("x", "doctor", PASSWORD)):
        with pytest.raises(ValueError):
            store.users.create(*bad)
    assert store.users.sign_in("a.nurse", "wrong password here", 60) is None
    assert store.users.sign_in("nobody", PASSWORD, 60) is None
    assert store.users.sign_in("a.nurse\x00", PASSWORD, 60) is None  # PostgreSQL-safe
    token, person = store.users.sign_in("a.nurse", PASSWORD, 60)
    assert (person.name, person.role) == ("a.nurse", "clinical")
    assert store.users.session(token).csrf == person.csrf != token


def test_sessions_end_and_stay_ended(store):
    store.users.create("b", "clinical", PASSWORD)
    t1, p1 = store.users.sign_in("b", PASSWORD, 60)
    t2, _ = store.users.sign_in("b", PASSWORD, 60)
    store.users.sign_out(p1.session_id)
    assert store.users.session(t1) is None and store.users.session(t2) is not None
    store.users.set_disabled("b", True)
    assert store.users.session(t2) is None
    assert store.users.sign_in("b", PASSWORD, 60) is None  # disabled
    store.users.set_disabled("b", False)
    assert store.users.session(t2) is None  # enabling does not revive a session
    t3, _ = store.users.sign_in("b", PASSWORD, 60)
    store.users.set_password("b", "another long password")
    assert store.users.session(t3) is None
    assert store.users.sign_in("b", PASSWORD, 60) is None
    assert store.users.sign_in("b", "another long password", 60) is not None


def test_sessions_expire_and_time_out_when_idle(store):
    store.users.create("c", "auditor", PASSWORD)
    token, _ = store.users.sign_in("c", PASSWORD, 120)
    now = utcnow()
    # each use is written (at most once a minute): idle time counts from the last one
    for minutes in (20, 45, 74):
        assert store.users.session(token, 30, now + timedelta(minutes=minutes)) is not None
    assert store.users.session(token, 30, now + timedelta(minutes=105)) is None  # idle 31
    token, _ = store.users.sign_in("c", PASSWORD, 60)
    assert store.users.session(token, 600, utcnow() + timedelta(minutes=61)) is None  # expired
