"""A training job end to end: MLflow runs, the model package, the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pandas as pd

from features.events import open_meds
from features.labels import label_column
from features.pipeline import build_training_frame
from training.censoring import CensoringSurvival
from training.registry import CHAMPION, model_name
from training.train import _xy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_censored_rows_never_reach_a_model_as_negatives(small_cohort_dir, tiny_task):
    frame, spec = build_training_frame(open_meds(small_cohort_dir), tiny_task)
    g = CensoringSurvival.fit(frame["event_time_days"].to_numpy(), frame["event_type"].to_numpy())
    for h in tiny_task.horizons_days:
        _x, y, w = _xy(frame, spec.feature_names, h, g)
        n_obs = frame[label_column(h)].notna().sum()
        assert len(y) == n_obs < len(frame)  # censored rows are dropped, not labelled 0
        assert set(np.unique(y)) == {0.0, 1.0} and (w > 0).all()


def test_runs_params_metrics_tags_inputs_and_artifacts(trained, tracker, tiny_task):
    client = tracker.client
    parent = client.get_run(trained.parent_run_id)
    assert parent.data.tags["data_digest"] == trained.data_digest
    assert len(trained.data_digest) == 64
    assert parent.data.tags["code_version"] and parent.data.tags["version.lightgbm"]
    ds = parent.inputs.dataset_inputs[0]
    assert {t.key: t.value for t in ds.tags}["twincast.sha256"] == trained.data_digest
    assert ds.dataset.digest == trained.data_digest[:32]
    children = client.search_runs([trained.experiment_id],
                                  f"tags.mlflow.parentRunId = '{trained.parent_run_id}'")
    assert {r.data.tags["family"] for r in children} == {"lightgbm", "hazard", "logistic"}
    for r in children:
        m = r.data.metrics
        for h in tiny_task.horizons_days:
            for name in ("auroc", "brier", "calibration_slope", "uno_c", "auprc"):
                assert m[f"{name}_{h}d_lo"] <= m[f"{name}_{h}d"] <= m[f"{name}_{h}d_hi"]
                assert f"{name}_{h}d_pw" in m
            # ECE is biased upwards under resampling: its interval need not cover it
            assert m[f"ece_{h}d_lo"] <= m[f"ece_{h}d_hi"]
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"model_card.md", "evaluation.json", "search.json", "plots"} <= files
        plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        assert plots == {f"plots/{p}.png" for p in ("roc", "calibration", "decision_curve",
                                                      "risk_distribution")}
        card = client.download_artifacts(r.info.run_id, "model_card.md")
        with open(card) as f:
            text = f.read()
        for section in ("Intended use", "Data", "Held-out performance", "Calibration",
                        "Subgroups", "Limitations"):
            assert f"## {section}" in text


def test_first_model_is_champion_with_reason(trained, tracker):
    name = model_name("eskd")
    champ = tracker.registry.version_by_alias(name, CHAMPION)
    assert str(champ.version) == trained.version and trained.promoted
    assert champ.tags["twincast.gate.decision"] == "promoted"
    assert "first champion" in champ.tags["twincast.gate.reason"]
    log = tracker.registry.promotion_log("eskd")
    assert [(e.from_version, e.to_version, e.kind) for e in log] == [(None, "1", "gate")]


def test_risks_are_monotone_across_horizons(trained):
    for cand in trained.candidates.values():
        r = cand.heldout_risk
        assert ((r >= 0) & (r <= 1)).all() and np.isfinite(r).all()
        assert (np.diff(r, axis=1) >= 0).all()


def test_no_patient_rows_in_the_input_example(trained, tracker, small_cohort):
    for cand in trained.candidates.values():
        with tracker.active():
            example = mlflow.pyfunc.load_model(cand.model_uri).input_example
        assert set(example["subject_id"]) == {0}
        assert not set(example["subject_id"]) & set(small_cohort["subject_id"])
        assert "TWINCAST//PREDICT_AT" in set(example["code"])


def test_champion_reproduces_heldout_predictions_in_a_fresh_process(trained, tracker,
                                                                     small_cohort, tmp_path):
    from training.train import heldout_request

    request = heldout_request(small_cohort, trained.heldout_rows)
    request.to_parquet(tmp_path / "request.parquet")
    script = textwrap.dedent(f"""
        import os, mlflow, pandas as pd
        os.chdir({str(tmp_path)!r})
        mlflow.set_tracking_uri({tracker.tracking_uri!r})
        model = mlflow.pyfunc.load_model("models:/{model_name('eskd')}@champion")
        out = model.predict(pd.read_parquet("request.parquet"), params={{"contributions": 3}})
        out.to_parquet("out.parquet")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pd.read_parquet(tmp_path / "out.parquet")
    expected = trained.candidates[trained.best].heldout_risk
    got = out[[f"risk_{h}d" for h in (365, 730)]].to_numpy()
    np.testing.assert_array_equal(got, expected)  # bit for bit
    contrib = json.loads(out["contributions"].iloc[0])
    assert contrib and {"feature", "value", "contribution", "horizon_days", "scale"} <= set(
        contrib[0])
