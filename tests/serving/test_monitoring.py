"""Monitoring end to end: a model trained on one cohort, a second cohort played through
the write path as a deployed service would have seen it (unshifted, and with an eGFR
assay that reads 30% high), then ``twincast monitor`` and ``GET /v1/monitoring``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from features.events import EventArrays, write_meds
from features.labels import labels_at
from features.simulate import CODES, Shift, simulate_cohort
from serving.bootstrap import build_service
from serving.config import ServingConfig
from serving.monitoring import VersionData, load_events, load_forecasts, monitor
from serving.playback import play
from serving.store import open_store
from tests.conftest import ESKD_TASK, fresh_pg_database
from tests.serving.conftest import start_server

SHIFT = Shift.parse("egfr_assay:1.3@2000-01-01")  # the whole deployment reads 30% high
DEPLOY = 700


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A champion trained on 2,000 patients (its own MLflow store)."""
    from features.task import load_task
    from training.tracking import Tracker
    from training.train import TrainOptions, train

    home = tmp_path_factory.mktemp("monitoring")
    cohort = write_meds(simulate_cohort(2000, seed=0), home / "train", codes=CODES,
                        shard_subjects=1000)
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", (home / "art").as_uri())
    # the risk models are what is monitored: no trajectories to fit
    task = load_task(ESKD_TASK).model_copy(update={"trajectories": []})
    train(cohort, task, tracker,
          TrainOptions(trials=2, n_bootstrap=50, seed=0, families=["lightgbm"]),
          log=lambda m: None)
    return home


def deployed(home, db_url: str, shift: Shift | None) -> pd.DataFrame:
    """A second cohort played into a fresh store; returns its events."""
    events = simulate_cohort(DEPLOY, seed=1, first_subject_id=1_000_000, shift=shift)
    cfg = ServingConfig(database_url=db_url, tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                        artifact_root=(home / "art").as_uri(), task="eskd",
                        model_poll_seconds=0)
    svc = build_service(cfg, start=False)
    svc.models.follow_champion("test")
    result = play(svc.store, svc.models, events, step_days=28)
    assert result.twins == events["subject_id"].nunique()
    svc.store.dispose()
    return events


@pytest.fixture(scope="module")
def unshifted(home):
    url = f"sqlite:///{home / 'unshifted.db'}"
    return url, deployed(home, url, None)


@pytest.fixture(scope="module")
def shifted_pg(home):
    with fresh_pg_database("twincast_monitor") as url:
        yield url, deployed(home, url, SHIFT)


def report_for(home, url: str) -> dict:
    from serving.model_source import ModelSource
    from training.tracking import Tracker

    source = ModelSource(Tracker(f"sqlite:///{home / 'mlflow.db'}", (home / "art").as_uri()),
                         "eskd")
    model = source.load()
    store = open_store(url)
    try:
        return monitor(store, model.bundle.task, model.name,
                       lambda v: VersionData(model.bundle, model.metrics),
                       window_days=5000)
    finally:
        store.dispose()


def test_stored_forecasts_get_the_training_labels_of_their_histories(home, unshifted):
    url, events = unshifted
    store = open_store(url)
    fc = load_forecasts(store, "twincast-eskd")
    arrays, _ = load_events(store, fc["subject_id"].to_numpy()).canonical()
    store.dispose()
    from features.task import load_task

    task = load_task(ESKD_TASK)
    sid, t = fc["subject_id"].to_numpy(), fc["as_of_us"].to_numpy()
    # the store's history, played in, labels every forecast as the MEDS file does
    assert labels_at(arrays, task, sid, t).equals(
        labels_at(EventArrays.from_events(events), task, sid, t))
    # and a forecast at one of training's prediction times gets training's label
    from features.labels import derive_labels

    train = derive_labels(EventArrays.from_events(events), task)
    train_t = train["prediction_time"].to_numpy("datetime64[us]").view(np.int64)
    both = pd.MultiIndex.from_arrays([sid, t]).isin(
        pd.MultiIndex.from_arrays([train["subject_id"].to_numpy(), train_t]))
    assert both.sum() > 1000
    got = labels_at(arrays, task, sid[both], t[both]).set_index(["subject_id",
                                                                 "prediction_time"])
    want = train.set_index(["subject_id", "prediction_time"]).loc[got.index]
    pd.testing.assert_frame_equal(got, want)
    # every forecast was made at most a step and the delay after its as-of time
    delay = (fc["created_us"] - fc["as_of_us"]) / 86_400e6
    assert delay.between(0, 28 + 1.01).all()


def test_unshifted_no_alert_and_the_estimate_meets_the_realised(home, unshifted):
    report = report_for(home, unshifted[0])
    assert report["tests"] > 10 and report["alerts"] == []
    (window,) = report["versions"]["1"]["windows"]
    for h in ("365", "730"):
        hw = window["horizons"][h]
        assert hw["judged"] and hw["matured_patients"] >= 100
        r, e = hw["realised"], hw["expected_on_matured"]
        # expected if calibration holds; on unshifted patients it holds, so the realised
        # AUROC meets it within its bootstrap interval widened by the estimate's own
        lo = r["auroc"]["lower"] - 2 * e["auroc"]["se"]
        hi = r["auroc"]["upper"] + 2 * e["auroc"]["se"]
        assert lo <= e["auroc"]["estimate"] <= hi, (r["auroc"], e["auroc"])
    drift = window["drift"]
    assert max(d["psi"] for d in drift["features"].values()) < 0.1


def test_shifted_cohort_raises_calibration_and_drift_alerts(home, shifted_pg):
    report = report_for(home, shifted_pg[0])
    kinds = {(a["kind"], a["name"]) for a in report["alerts"]}
    assert ("metric", "citl") in kinds, report["alerts"]
    assert any(k == "drift" and n.startswith("LAB//EGFR") for k, n in kinds), kinds
    citl = next(a for a in report["alerts"] if a["name"] == "citl")
    # observed risk above the predicted (the model reads kidneys as healthier)
    assert citl["value"] > citl["reference"] + citl["evidence"]["margin"]
    assert citl["evidence"]["interval"][0] > citl["evidence"]["margin"]


def test_monitor_stores_alerts_logs_mlflow_and_the_endpoint_serves_them(
        home, shifted_pg, tmp_path_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    from twincast.cli import app

    url, _ = shifted_pg
    env = {"TWINCAST_HOME": str(home), "TWINCAST_MLFLOW_URI": f"sqlite:///{home / 'mlflow.db'}",
           "TWINCAST_DATABASE_URL": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["monitor", "--task", "eskd", "--window", "5000d",
                                      "--json", str(out)], env=env)
    assert result.exit_code == 1, result.output  # an alert fired
    assert "alert(s)" in result.output and "citl" in result.output
    report = json.loads(out.read_text())
    run = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(report["mlflow_run_id"])
    assert run.data.tags["twincast.kind"] == "monitoring"
    assert int(run.data.tags["monitoring.alerts"]) == len(report["alerts"]) > 0
    assert any(k.endswith("realised_auroc_730d") for k in run.data.metrics)
    store = open_store(url)
    stored = store.alerts.recent("twincast-eskd")
    store.dispose()
    assert len(stored) == len(report["alerts"])
    assert {a["run_id"] for a in stored} == {report["mlflow_run_id"]}
    # a second run judges the same windows: the same alerts are not stored again
    again = CliRunner().invoke(app, ["monitor", "--task", "eskd", "--window", "5000d"],
                               env=env)
    assert again.exit_code == 1, again.output
    store = open_store(url)
    assert len(store.alerts.recent("twincast-eskd")) == len(stored)
    store.dispose()
    # thresholds from a task file, without retraining: a margin nothing can exceed
    import yaml

    loose = tmp_path / "loose.yaml"
    data = yaml.safe_load(ESKD_TASK.read_text())
    data["monitoring"] = {"margins": {"citl": 50, "auroc": 1, "brier": 1, "ece": 1,
                                      "calibration_slope": 50}, "psi_threshold": 1000}
    loose.write_text(yaml.safe_dump(data))
    calm = CliRunner().invoke(app, ["monitor", "--task", "eskd", "--window", "5000d",
                                    "--no-log", "--thresholds", str(loose)], env=env)
    assert calm.exit_code == 0 and "no alerts" in calm.output, calm.output
    # the self-contained page: alerts, the retraining window, calibration then and now
    page = tmp_path / "monitoring.html"
    made = CliRunner().invoke(app, ["report", "--monitoring", "--task", "eskd", "--out",
                                    str(page)], env=env)
    assert made.exit_code == 0, made.output
    html = page.read_text()
    assert "citl" in html and "The data window a retraining should use" in html
    assert "then (held-out)" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # nothing fetched
    with start_server("monitor", tmp_path_factory, home, db_url=url) as srv:
        with srv.client("clinical") as c:
            assert c.get("/v1/monitoring").status_code == 403
        with srv.client(None) as c:
            assert c.get("/v1/monitoring").status_code == 401
        with srv.client("auditor") as c:
            r = c.get("/v1/monitoring", params={"window_days": 5000})
            assert r.status_code == 200, r.text
            body = r.json()
            empty = c.get("/v1/monitoring", params={"since": "2020-01-01",
                                                    "until": "2019-01-01"})
            assert empty.status_code == 200 and empty.json()["versions"] == {}
            assert "holds no day" in empty.json()["note"]
            for bad in ({"window_days": 1}, {"since": "2020-13-01"}, {"until": "0"},
                        {"since": "yesterday"}):
                r = c.get("/v1/monitoring", params=bad)
                assert r.status_code == 422 and r.json()["fields"], (bad, r.text)
        assert {a["name"] for a in body["alerts"]} == {a["name"] for a in report["alerts"]}
        assert len(body["stored_alerts"]) == len(stored)
        # no patient's id or values: aggregates only, no count of 1 to 9 patients
        text = json.dumps(body)
        for sid in range(1_000_000, 1_000_000 + DEPLOY, 37):
            assert f'"{sid}"' not in text and f": {sid}," not in text

        def small(x):
            return isinstance(x, int) and 0 < x < 10

        for v in body["versions"].values():
            assert not small(v["patients"]) and not small(v["forecasts"])
            for w in v["windows"]:
                assert not small(w["patients"]) and not small(w["forecasts"])
                assert all(c["patients"] >= 10 for c in w["volume"].values())
                for hw in w["horizons"].values():
                    for k in ("patients", "matured_patients", "events", "forecasts"):
                        assert not small(hw.get(k)), (k, hw.get(k))


def test_known_after_takes_the_earliest_arrival_of_anything_later():
    """Brute force on random histories with many events at the same time."""
    from serving.monitoring import NEVER, known_after

    rng = np.random.default_rng(0)
    n = 3000
    sid = np.sort(rng.integers(0, 40, n))
    t = rng.integers(0, 30, n) * 86_400_000_000  # days: many ties
    order = np.lexsort((t, sid))
    sid, t = sid[order], t[order]
    rec = t + rng.integers(0, 60, n) * 86_400_000_000
    arrays = EventArrays(sid, t, np.zeros(n, np.int32), ("A",), np.zeros(n))
    qs, qt = rng.integers(0, 45, 500), rng.integers(-1, 31, 500) * 86_400_000_000
    got = known_after(arrays, rec, qs, qt)
    for k in range(500):
        later = (sid == qs[k]) & (t > qt[k])
        assert got[k] == (rec[later].min() if later.any() else NEVER)


def test_outcomes_dated_before_the_as_of_time_leave_a_forecast_out(small_cohort, eskd_task):
    from features.labels import subject_summary
    from serving.monitoring import _eligible_now

    arrays = EventArrays.from_events(small_cohort)
    summary = subject_summary(arrays, eskd_task)
    s = summary[summary["outcome_us"] < np.iinfo(np.int64).max].iloc[0]
    sid = np.array([s["subject_id"]] * 3 + [10**9])
    at = np.array([s["outcome_us"] - 1, s["outcome_us"], s["outcome_us"] + 1, 0])
    assert _eligible_now(summary, sid, at).tolist() == [True, False, False, True]
