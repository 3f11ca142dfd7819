"""The promotion gate: a better challenger becomes champion, one that is not better stays
challenger, both with their reasons recorded; every alias move is logged in MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import pytest

from features.events import open_meds
from features.pipeline import build_training_frame
from tests.conftest import TINY_OPTIONS
from training.bundle import ModelBundle
from training.calibration import PlattCalibrator
from training.errors import RegistryError
from training.package import log_package
from training.registry import CHALLENGER, CHAMPION, model_name
from training.tracking import Tracker
from training.train import TrainOptions, train


@dataclass
class ConstantRisk:
    """A model that knows nothing: the same risk for everyone."""

    p: float

    def score(self, x):
        return np.full(x.shape[0], self.p)

    def contributions(self, x):
        return np.zeros(x.shape)

    def fitted_params(self):
        return {"p": self.p}


@pytest.fixture
def fresh_tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "art").as_uri())


def test_gate_promotes_the_better_and_keeps_the_not_better(small_cohort_dir, tiny_task,
                                                           fresh_tracker, tmp_path):
    name = model_name(tiny_task.name)
    _, spec = build_training_frame(open_meds(small_cohort_dir), tiny_task)
    baseline = ModelBundle(tiny_task, spec, "constant", {}, [ConstantRisk(0.05)] * 2,
                           [PlattCalibrator()] * 2, metadata={"data_digest": "none",
                                                             "code_version": "test"})
    reg = fresh_tracker.registry
    with fresh_tracker.active():
        exp = fresh_tracker.experiment_id(name)
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_package(baseline, tmp_path / "pkg")
    v1 = reg.register(name, info.model_uri, run.info.run_id, {"family": "constant"})
    reg.promote(name, v1.version, actor="alice", kind="manual", reason="a baseline to beat",
                task_name=tiny_task.name)

    better = train(small_cohort_dir, tiny_task, fresh_tracker, TrainOptions(**TINY_OPTIONS),
                   log=lambda m: None)
    assert better.promoted and "beats the champion" in better.reason
    assert str(reg.version_by_alias(name, CHAMPION).version) == better.version == "2"
    tags = fresh_tracker.client.get_model_version(name, "2").tags
    assert tags["twincast.gate.decision"] == "promoted"
    run_tags = fresh_tracker.client.get_run(better.candidates[better.best].run_id).data.tags
    assert run_tags["twincast.gate.reason"] == better.reason

    same = train(small_cohort_dir, tiny_task, fresh_tracker, TrainOptions(**TINY_OPTIONS),
                 log=lambda m: None)
    assert not same.promoted and "does not beat the champion" in same.reason
    assert str(reg.version_by_alias(name, CHAMPION).version) == "2"
    assert str(reg.version_by_alias(name, CHALLENGER).version) == same.version == "3"
    assert fresh_tracker.client.get_model_version(name, "3").tags[
        "twincast.gate.decision"] == "rejected"
    # same seed and data, same metrics
    for fam in same.candidates:
        a = fresh_tracker.client.get_run(better.candidates[fam].run_id).data.metrics
        b = fresh_tracker.client.get_run(same.candidates[fam].run_id).data.metrics
        assert a == b

    reg.promote(name, "3", actor="bob", kind="manual", reason="roll forward for a test",
                task_name=tiny_task.name)
    log = reg.promotion_log(tiny_task.name)
    assert [(e.from_version, e.to_version, e.kind, e.actor) for e in log] == [
        (None, "1", "manual", "alice"), ("1", "2", "gate", "gate"), ("2", "3", "manual", "bob")]
    assert "beats the champion" in log[1].reason
    states = {v: fresh_tracker.client.get_model_version(name, v).tags["twincast.state"]
              for v in ("1", "2", "3")}
    assert states == {"1": "retired", "2": "retired", "3": "champion"}
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote(name, "3", actor="bob", kind="manual", reason="again",
                    task_name=tiny_task.name)
    with pytest.raises(RegistryError, match="no version 9"):
        reg.promote(name, "9", actor="bob", kind="manual", reason="x", task_name=tiny_task.name)
