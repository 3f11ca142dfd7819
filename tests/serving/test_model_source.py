"""The served model's artifact is checked against the SHA-256 recorded at registration
before it is unpickled: a swapped artifact is refused and named."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import mlflow
import pytest

from serving.errors import ArtifactRefused
from serving.model_source import ModelSource
from training.registry import BUNDLE_DIGEST_TAG, CHAMPION, model_name
from training.tracking import Tracker


@pytest.fixture
def copy_tracker(tracker, trained, tmp_path) -> Tracker:
    """A copy of the session's MLflow store: registrations here touch no other test."""
    shutil.copy(tracker.tracking_uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tracker.artifact_root)


def test_the_recorded_digest_is_checked_and_a_swapped_artifact_refused(copy_tracker,
                                                                         tmp_path):
    source = ModelSource(copy_tracker, "eskd")
    reg, name = copy_tracker.registry, model_name("eskd")
    champ = reg.version_by_alias(name, CHAMPION)
    with copy_tracker.active():
        model_dir = Path(mlflow.artifacts.download_artifacts(champ.source,
                                                             dst_path=str(tmp_path / "m")))
    original = (model_dir / "artifacts" / "bundle.pkl").read_bytes()
    assert champ.tags[BUNDLE_DIGEST_TAG] == hashlib.sha256(original).hexdigest()
    assert source.load(str(champ.version)).version == str(champ.version)
    # the same package with its bundle swapped for another pickle, registered again
    bundle = model_dir / "artifacts" / "bundle.pkl"
    bundle.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    swapped = reg.register(name, str(model_dir), champ.run_id, {"family": "swapped"})
    assert swapped.tags[BUNDLE_DIGEST_TAG] == champ.tags[BUNDLE_DIGEST_TAG]  # from the run
    with pytest.raises(ArtifactRefused, match=f"version {swapped.version} .*does not match"):
        source.load(str(swapped.version))
    # a version with no recorded digest anywhere is refused too
    copy_tracker.client.delete_model_version_tag(name, str(swapped.version), BUNDLE_DIGEST_TAG)
    copy_tracker.client.delete_tag(champ.run_id, BUNDLE_DIGEST_TAG)
    with pytest.raises(ArtifactRefused, match="no recorded SHA-256"):
        source.load(str(swapped.version))
