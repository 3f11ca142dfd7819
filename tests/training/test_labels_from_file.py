"""A task whose labels come from an ACES label directory, the whole path: training set →
training → the promotion gate → a forecast served by the real service code.

The labels are derived once from the synthetic cohort by the task's own rules (censored
rows left out, as a label file has none) and written as ACES writes them, split by
subject with a rule that is not twincast's hash, so the directory's split must be the one
used.  The task still names its outcome codes: the service uses them to say what happened
after a forecast.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from serving.bootstrap import build_service
from serving.config import ServingConfig
from serving.writes import AccessInfo, Caller, TwinInput
from tests.conftest import TINY_OPTIONS, aces_labels, write_aces_labels
from tests.serving.conftest import event_rows
from tests.training.test_gate import ConstantRisk
from training.bundle import ModelBundle
from training.calibration import PlattCalibrator
from training.package import log_package
from training.registry import CHAMPION, model_name
from training.report import write_report
from training.tracking import Tracker
from training.train import TrainOptions, heldout_request, train

H = 730
NAME = "eskd-aces"
AFTER = ("DX//ESKD", "MEDS_DEATH", "ADMIN//END_OF_FOLLOWUP")  # what a forecast precedes


@pytest.fixture
def aces_task(tmp_path, small_cohort, tiny_task):
    """The tiny ESKD task at one horizon, reading ``aces/eskd`` beside its YAML file."""
    from features.task import load_task

    labels = aces_labels(small_cohort, tiny_task, H)
    write_aces_labels(labels, tmp_path / "aces" / "eskd")
    data = tiny_task.model_dump(mode="json")
    data.update(name=NAME, horizons_days=[H], labels={"path": "aces/eskd"})
    data["alerts"]["thresholds"] = [t for t in data["alerts"]["thresholds"]
                                    if t["horizon_days"] == H]  # its one horizon's
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(data))
    return load_task(tmp_path / "task.yaml"), labels


def test_labels_from_an_aces_directory_train_gate_and_serve(tmp_path, small_cohort_dir,
                                                            small_cohort, aces_task):
    task, labels = aces_task
    assert task.outcome.codes == ["DX//ESKD"] and task.labels.path.is_dir()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "art").as_uri())
    name = model_name(NAME)
    _register_constant_champion(tracker, task, small_cohort_dir, tmp_path)
    options = TrainOptions(**TINY_OPTIONS)

    # training: every label row used as given, nothing censored, the directory's split
    first = train(small_cohort_dir, task, tracker, options, log=lambda m: None)
    held = labels[labels["split"] == "held_out"]
    assert sorted(first.heldout_rows["subject_id"].unique()) == sorted(held["subject_id"]
                                                                       .unique())
    assert len(first.heldout_rows) == len(held)
    best = first.candidates[first.best]
    entry = best.report["horizons"][str(H)]
    assert entry["censored_rows"] == 0 and entry["observed_rows"] == len(held)
    assert entry["positives"] == int(held["boolean_value"].sum()) > 5
    assert entry["rows"]["auroc"]["estimate"] > 0.8  # falling eGFR predicts kidney failure
    assert np.isnan(entry["rows"]["uno_c"]["estimate"])  # no event times in a label file
    assert best.heldout_risk.shape == (len(held), 1)
    run = tracker.client.get_run(best.run_id)
    assert f"auroc_{H}d" in run.data.metrics and f"uno_c_{H}d" not in run.data.metrics
    card = Path(tracker.client.download_artifacts(best.run_id, "model_card.md")).read_text()
    assert "labels: as given in the MEDS label file(s) `eskd`" in card and "nan" not in card
    report = write_report(tracker, first.parent_run_id, tmp_path / "report.html", log=False)
    text = re.sub(r"data:image/png;base64,[^']*", "", report.read_text())  # plots aside
    assert f"{H} days: censored rows</td><td>0 (0.0%)" in text
    assert "unknown (labels from a MEDS label file)" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)

    # the gate compared with the champion on the same held-out subjects, both ways
    assert first.promoted and "beats the champion" in first.reason, first.reason
    again = train(small_cohort_dir, task, tracker, options, log=lambda m: None)
    assert not again.promoted and "does not beat the champion" in again.reason
    assert "improvement +0.0000" in again.reason  # the same data and seed: the same model
    champion = tracker.registry.version_by_alias(name, CHAMPION)
    assert str(champion.version) == first.version == "2" and again.version == "3"

    # the service serves the champion, a risk at the label file's horizon, equal to the
    # model package's; after the outcome the twin is no longer eligible
    sid = int(held["subject_id"].iloc[0])
    ev = small_cohort[(small_cohort["subject_id"] == sid) & ~small_cohort["code"].isin(AFTER)]
    svc = build_service(ServingConfig(
        database_url=f"sqlite:///{tmp_path / 'twins.db'}", tracking_uri=tracker.tracking_uri,
        artifact_root=tracker.artifact_root, task=NAME, model_poll_seconds=0), start=False)
    try:
        svc.models.follow_champion("test")
        served = svc.models.current()
        assert served.version == first.version and served.bundle.task.labels is not None
        assert served.bundle.task.outcome.codes == ["DX//ESKD"]
        access = AccessInfo("POST", f"/v1/twins/{sid}/events", "ingest")
        out = svc.writer.write([TwinInput(sid, events=event_rows(ev))], Caller("ward"), access)
        fc = out[0].forecast
        assert fc["status"] == "ok" and fc["model"]["version"] == first.version, fc
        assert set(fc["risks"]) == {f"{H}d"} and 0 < fc["risks"][f"{H}d"] < 1
        at = ev["time"].max()
        ask = pd.DataFrame({"subject_id": [sid], "prediction_time": [at]})
        with tracker.active():
            package = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
        expected = package.predict(heldout_request(ev, ask))[f"risk_{H}d"].iloc[0]
        assert fc["risks"][f"{H}d"] == expected
        stateless = svc.writer.stateless(sid, event_rows(ev), None)
        assert stateless["risks"] == fc["risks"] and not stateless["stored"]
        outcome = pd.DataFrame({"time": [at + timedelta(days=30)], "code": ["DX//ESKD"],
                                "numeric_value": [np.nan]})
        later = svc.writer.write([TwinInput(sid, events=event_rows(outcome))],
                                 Caller("ward"), access)[0].forecast
        assert later["status"] == "not_eligible"
        assert later["reason"] == "the outcome has already happened"
    finally:
        svc.store.dispose()


def _register_constant_champion(tracker: Tracker, task, meds_dir, tmp_path) -> None:
    """Version 1: a model that gives everyone the same risk, made champion by hand."""
    from features.events import open_meds
    from features.pipeline import TrainingSetBuilder

    spec = TrainingSetBuilder(open_meds(meds_dir), task).fit_spec()
    baseline = ModelBundle(task, spec, "constant", {}, [ConstantRisk(0.05)],
                           [PlattCalibrator()], metadata={"data_digest": "none",
                                                          "code_version": "test"})
    name = model_name(task.name)
    with tracker.active(), mlflow.start_run(experiment_id=tracker.experiment_id(name)) as run:
        info = log_package(baseline, tmp_path / "pkg")
    version = tracker.registry.register(name, info.model_uri, run.info.run_id,
                                        {"family": "constant"})
    tracker.registry.promote(name, version.version, actor="test", kind="manual",
                             reason="a baseline to beat", task_name=task.name)
