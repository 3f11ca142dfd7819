"""Wiring: a :class:`ServingConfig` → store (migrated) → model source → service."""

from __future__ import annotations

import logging

from serving.cds import Verifier
from serving.config import ServingConfig
from serving.core import TwinService
from serving.errors import NotReady
from serving.model_source import ModelSource, only_task
from serving.offline import go_offline
from serving.store import open_store
from training.tracking import Tracker


def tracker_for(config: ServingConfig) -> Tracker:
    root = config.artifact_root if config.tracking_uri.startswith("sqlite:") else None
    return Tracker(config.tracking_uri, root)


def build_service(config: ServingConfig, *, start: bool = True) -> TwinService:
    go_offline(service=True)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    store = open_store(config.database_url)
    tracker = tracker_for(config)
    task = config.task or only_task(tracker)
    if task is None:
        raise NotReady("which task? set TWINCAST_TASK (or --task): the registry holds "
                       "no single twincast model")
    service = TwinService(config, store, ModelSource(tracker, task))
    service.cds_verifier = Verifier(config.cds_clients, store.replay)
    if start:
        service.start()
    return service
