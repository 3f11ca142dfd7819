"""Wiring: settings → store (migrated) → model source → core.  Used by the service and CLI."""

from __future__ import annotations

import logging

from serving.errors import NotReady
from twincast.settings import Settings, go_offline


def tracker_for(settings: Settings):
    from training.tracking import Tracker

    uri = settings.tracking_uri()
    root = settings.artifact_root() if uri.startswith("sqlite:") else None
    return Tracker(uri, root)


def build_core(settings: Settings | None = None, *, start: bool = True):
    from serving.core import TwinCore
    from serving.model_source import ModelSource, only_task
    from serving.store.repo import open_store

    go_offline()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    settings = settings or Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.database())
    tracker = tracker_for(settings)
    task = settings.task or only_task(tracker)
    if task is None:
        raise NotReady("which task? set TWINCAST_TASK (or --task): the registry holds "
                       "no single twincast model")
    core = TwinCore(store, ModelSource(tracker, task), poll_seconds=settings.model_poll_seconds)
    core.cds_clients = settings.cds_clients
    core.cds_thresholds = (settings.cds_warning, settings.cds_critical)
    if start:
        core.start()
    return core
