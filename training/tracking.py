"""The MLflow tracker handed to training: one experiment per task, a parent run per
training job, a child run per candidate.  Nothing here runs at import time."""

from __future__ import annotations

import contextlib
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from training.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TRACKED_PACKAGES = ("twincast", "numpy", "pandas", "pyarrow", "scikit-learn", "lightgbm",
                    "mlflow", "bentoml")


class Tracker:
    """MLflow at one tracking URI (SQLite file, or a tracking server)."""

    def __init__(self, tracking_uri: str, artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.registry = Registry(self.client, self.active, self.experiment_id)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root:
            location = f"{self.artifact_root.rstrip('/')}/{name}"
        return self.client.create_experiment(name, artifact_location=location)

    @contextlib.contextmanager
    def active(self):
        """Point MLflow's fluent API (needed by ``log_model``) at this tracker, then back."""
        # MLflow mirrors these in environment variables; restore them exactly (unset stays
        # unset) so nothing leaks into later settings or subprocesses
        before = os.environ.get("MLFLOW_TRACKING_URI")
        before_registry = os.environ.get("MLFLOW_REGISTRY_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            mlflow.set_registry_uri(before_registry)
            for key, value in (("MLFLOW_TRACKING_URI", before),
                               ("MLFLOW_REGISTRY_URI", before_registry)):
                if value is None:
                    os.environ.pop(key, None)


def code_version() -> str:
    """The git commit of the code (with ``-dirty`` for uncommitted changes), or the
    package version when not in a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return f"twincast-{_version('twincast')}"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def package_versions() -> dict[str, str]:
    return {f"version.{p}": _version(p) for p in TRACKED_PACKAGES}
