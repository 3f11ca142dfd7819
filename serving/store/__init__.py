"""The twin store (SQLAlchemy 2 + Alembic): small repositories over one database.

``open_store(url)`` migrates and returns a :class:`Store` whose parts are ``twins``
(twins, events, forecasts, views), ``identities`` (external identifiers), ``keys``,
``access`` (the access log), ``jobs`` (served version and refresh jobs) and ``replay``
(CDS Hooks tokens seen), ``leases``, ``alerts`` (monitoring), ``risks`` (each twin's
current risk per horizon and the care team's alerts) and ``users`` (the pages' people).
"""

from __future__ import annotations

from serving.store.access import Access
from serving.store.alerts import Alerts
from serving.store.db import Database, upgrade
from serving.store.identity import Identities
from serving.store.jobs import Jobs
from serving.store.keys import Keys
from serving.store.leases import Leases
from serving.store.replay import Replay
from serving.store.risks import Risks
from serving.store.twins import Twins
from serving.store.users import Users


class Store:
    def __init__(self, url: str):
        self.db = Database(url)
        self.twins = Twins(self.db.sqlite)
        self.identities = Identities(self.db.sqlite, self.twins)
        self.keys = Keys(self.db)
        self.access = Access(self.db)
        self.jobs = Jobs(self.db, self.twins)
        self.replay = Replay(self.db)
        self.leases = Leases(self.db)
        self.alerts = Alerts(self.db)
        self.risks = Risks(self.twins)
        self.users = Users(self.db)

    @property
    def sqlite(self) -> bool:
        return self.db.sqlite

    @property
    def engine(self):
        return self.db.engine

    def read(self):
        return self.db.read()

    def write(self, *, urgent: bool = True):
        return self.db.write(urgent=urgent)

    def dispose(self) -> None:
        self.access.flush()
        self.db.dispose()


def open_store(url: str, *, migrate: bool = True) -> Store:
    store = Store(url)
    if migrate:
        upgrade(store.engine)
    return store
