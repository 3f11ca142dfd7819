"""The model a worker serves, kept in step with the other workers.

The served-version row in the store is the one truth: a worker that notices the
``champion`` alias move loads that version and moves the row (creating a refresh job in
the same transaction); every write transaction compares the row with its own model and
reloads first when behind.  Loaded versions are kept, so a roll-back is instant.
"""

from __future__ import annotations

import logging
import threading

from serving.errors import NotReady
from serving.model_source import LoadedModel, ModelSource
from serving.store import Store
from serving.store.jobs import AliasMoved

log = logging.getLogger("twincast.service")


class ModelHolder:
    def __init__(self, store: Store, source: ModelSource, worker: str):
        self.store = store
        self.source = source
        self.worker = worker
        self.model: LoadedModel | None = None
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.source.name

    def current(self) -> LoadedModel:
        model = self.model
        if model is None:
            raise NotReady(f"no model loaded: {self.source.name} has no champion yet")
        return model

    def served_version(self) -> str | None:
        with self.store.read() as s:
            return self.store.jobs.served_version(s, self.name)

    def current_served(self) -> LoadedModel:
        """The current model, after catching up with the served version if behind."""
        served = self.served_version()
        if served is not None and (self.model is None or self.model.version != served):
            self.sync_to(served)
        return self.current()

    def _load(self, version: str) -> LoadedModel:
        model = self._loaded.get(version)
        if model is None:
            model = self.source.load(version)
            self._loaded[version] = model
        return model

    def sync_to(self, version: str) -> LoadedModel:
        """Serve ``version`` (the served-version row says so)."""
        with self._lock:
            if self.model is None or self.model.version != version:
                self.model = self._load(version)
                log.info("serving %s version %s (the served version)", self.name, version)
            return self.model

    def follow_champion(self, reason: str) -> tuple[bool, int | None]:
        """Load the alias's version when it is not the one served; move the served row.
        Returns (changed here, refresh job created).  The alias is read again under the
        served row's lock, so a read that went stale while this worker waited for it
        never moves the row back to an older move."""
        for _ in range(3):
            version = self.source.champion_version()
            if version is None:
                raise NotReady(f"{self.name} has no champion yet: train and promote a "
                               "model first")
            with self._lock:
                before = self.model.version if self.model else None
                model = self._load(version)
                try:
                    job = self.store.jobs.adopt(model.name, model.version, model.run_id,
                                                self.worker, reason,
                                                confirm=self.source.champion_version)
                except AliasMoved:
                    continue  # read the alias again
                self.model = model
            if before != version:
                log.info("serving %s version %s (%s)", self.name, version, reason)
            return before != version, job
        raise NotReady(f"the champion alias of {self.name} keeps moving: try again shortly")
