"""Where the served model comes from: the ``champion`` alias in the MLflow registry."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import mlflow

from serving.errors import ArtifactRefused, NotReady
from training.bundle import ModelBundle
from training.registry import BUNDLE_DIGEST_TAG, CHAMPION, model_name
from training.tracking import Tracker


@dataclass
class LoadedModel:
    bundle: ModelBundle
    name: str
    version: str
    run_id: str
    loaded_at: datetime
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @cached_property
    def spec_digest(self) -> str:
        return self.bundle.spec.digest()

    @cached_property
    def task_digest(self) -> str:
        return self.bundle.task.digest()

    @cached_property
    def feature_labels(self) -> dict[str, tuple[str | None, str]]:
        """Per feature name, (unit, readable label): filled as forecasts explain them."""
        return {}

    @property
    def code_version(self) -> str:
        return str(self.bundle.metadata.get("code_version", "unknown"))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id,
                "family": self.bundle.family, "horizons_days": self.bundle.horizons,
                "feature_spec_digest": self.spec_digest, "task_digest": self.task_digest,
                "data_digest": self.bundle.metadata.get("data_digest"),
                "code_version": self.code_version, "loaded_at": self.loaded_at,
                "metrics": self.metrics}


class ModelSource:
    """Loads ``models:/twincast-<task>@champion`` (bundle only: no pyfunc environment)."""

    def __init__(self, tracker: Tracker, task_name: str):
        self.tracker = tracker
        self.task_name = task_name
        self.name = model_name(task_name)

    def champion_version(self) -> str | None:
        mv = self.tracker.registry.version_by_alias(self.name, CHAMPION)
        return None if mv is None else str(mv.version)

    def load(self, version: str | None = None) -> LoadedModel:
        version = version or self.champion_version()
        if version is None:
            raise NotReady(f"{self.name} has no champion yet: train and promote a model first")
        mv = self.tracker.registry.version(self.name, version)
        run = self.tracker.client.get_run(mv.run_id)
        with self.tracker.active():
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.name}/{version}/artifacts/bundle.pkl")
        data = Path(path).read_bytes()
        verify_bundle(data, self.name, str(version), mv.tags, run.data.tags)
        bundle = ModelBundle.loads(data)  # unpickled only once its digest is checked
        return LoadedModel(bundle, self.name, str(version), mv.run_id,
                           datetime.now(UTC), dict(run.data.metrics), dict(mv.tags))


def verify_bundle(data: bytes, name: str, version: str, version_tags: dict[str, str],
                  run_tags: dict[str, str]) -> str:
    """Check a bundle artifact's SHA-256 against the digest recorded in the tracking store
    (the version's tag, else its run's) before it is unpickled; returns the digest.  A
    swapped or corrupted artifact, or one with no recorded digest, is refused by name."""
    expected = version_tags.get(BUNDLE_DIGEST_TAG) or run_tags.get(BUNDLE_DIGEST_TAG)
    where = f"{name} version {version} (artifact bundle.pkl)"
    if not expected:
        raise ArtifactRefused(f"{where} has no recorded SHA-256: register it with twincast "
                              "so its digest is recorded, or tag it by hand after checking")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ArtifactRefused(f"{where} does not match its recorded SHA-256 "
                              f"({expected[:12]}…, found {actual[:12]}…): the artifact was "
                              "changed after registration; refusing to load it")
    return actual


def only_task(tracker: Tracker) -> str | None:
    """The task of the only registered twincast model, if there is exactly one."""
    names = [m.name for m in tracker.client.search_registered_models()
             if m.name.startswith("twincast-")]
    return names[0].removeprefix("twincast-") if len(names) == 1 else None
