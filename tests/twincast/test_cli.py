"""The ``twincast`` command line, run as a user would (a real subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ESKD_TASK, PBC_MEDS, PBC_TASK

BIN = Path(sys.executable).parent / "twincast"


def run(*args: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TWINCAST_HOME": str(cwd / ".twincast") if cwd else ".twincast"}
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_simulate_then_features(tmp_path):
    run("simulate", "--subjects", "300", "--seed", "5", "--out", str(tmp_path / "c"))
    assert len(list((tmp_path / "c" / "data").glob("*.parquet"))) == 1
    proc = run("features", "--events", str(tmp_path / "c"), "--task", str(ESKD_TASK),
               "--out", str(tmp_path / "train.parquet"))
    frame = pd.read_parquet(tmp_path / "train.parquet")
    assert {"subject_id", "prediction_time", "split", "label_730d"} <= set(frame.columns)
    assert f"{len(frame):,}" in proc.stdout


def test_simulate_refuses_to_overwrite(tmp_path):
    run("simulate", "--subjects", "100", "--out", str(tmp_path / "c"))
    proc = run("simulate", "--subjects", "100", "--out", str(tmp_path / "c"), ok=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr


def test_import_csv_reports_line_and_writes_nothing(tmp_path):
    (tmp_path / "e.csv").write_text("subject_id,time,code,numeric_value\n"
                                    "1,2020-01-01,LAB//EGFR,40\n1,yesterday,LAB//EGFR,41\n")
    proc = run("import", "csv", str(tmp_path / "e.csv"), "--out", str(tmp_path / "m"), ok=False)
    assert proc.returncode == 2
    assert "e.csv, line 3, subject 1, column 'time': unparseable time" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_import_wide_pbc_raw_round_trip(tmp_path):
    """The shipped PBC MEDS data is what the shipped converter makes from the raw file."""
    src = PBC_MEDS.parent
    work = tmp_path / "pbc"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("meds"))
    subprocess.run([sys.executable, str(work / "convert.py")], check=True, capture_output=True)
    a = pd.read_parquet(work / "meds" / "data" / "0.parquet")
    b = pd.read_parquet(PBC_MEDS / "data" / "0.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_task_validation_command():
    proc = run("task", str(PBC_TASK))
    assert '"name": "pbc"' in proc.stdout


@pytest.mark.parametrize("bad", ["horizons_days: [0]", "colour: red"])
def test_task_validation_command_rejects(tmp_path, bad):
    text = f"name: t\noutcome: {{codes: [A]}}\nhorizons_days: [1]\n{bad}\n"
    (tmp_path / "t.yaml").write_text(text)
    proc = run("task", str(tmp_path / "t.yaml"), ok=False)
    assert proc.returncode == 2 and "t.yaml" in proc.stderr


def test_import_fhir_writes_meds_and_reports_unmapped(tmp_path):
    bundles = PBC_MEDS.parents[1] / "fhir"
    proc = run("import", "fhir", str(bundles / "ckd_patients.json"),
               str(bundles / "hba1c_mmol.json"), "--out", str(tmp_path / "m"))
    assert "5 patients" in proc.stderr
    assert "skipped: AllergyIntolerance × 1" in proc.stderr
    ids = pd.read_parquet(tmp_path / "m" / "metadata" / "fhir_identifiers.parquet")
    assert ids["subject_id"].tolist() == [1, 2, 3, 4, 5]
    events = pd.read_parquet(tmp_path / "m" / "data" / "0.parquet")
    assert set(events["subject_id"]) == {1, 2, 3, 4, 5}
    hba1c = events.loc[events["code"] == "LAB//HBA1C", "numeric_value"]
    assert hba1c.between(3, 15).all()
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Bundle", "type": "collection", "entry": [{}]}')
    proc = run("import", "fhir", str(bad), "--out", str(tmp_path / "n"), ok=False)
    assert proc.returncode == 2 and "bad.json: entry[0].resource" in proc.stderr
    assert not (tmp_path / "n").exists()


def test_import_fhir_takes_a_bulk_export_and_reports_starved_features(tmp_path, trained,
                                                                       mlflow_home):
    import json

    from carebundle import generate_cohort, to_ndjson

    export = tmp_path / "export"
    export.mkdir()
    cohort = generate_cohort(count=5, seed=8, prevalence={"ckd_stage3": 1.0},
                             include_vitals=False)
    for kind, lines in to_ndjson(cohort).items():
        (export / f"{kind}.ndjson").write_text(lines)
    env_home = tmp_path / "home"
    proc = subprocess.run(
        [str(BIN), "import", "fhir", str(export), "--out", str(tmp_path / "m"), "--report",
         "--task", "eskd"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TWINCAST_HOME": str(env_home),
             "TWINCAST_MLFLOW_URI": f"sqlite:///{mlflow_home / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stderr
    assert "5 patients" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["champion"] == "checked" and report["patients"] == 5
    assert report["coverage"]["Observation"]["kept"] > 0
    starved = {s["code"]: s for s in report["starved"]}
    assert "VITAL//SBP" in starved  # no vitals sent: every blood-pressure feature starves
    assert "LAB//EGFR" not in starved
    ids = pd.read_parquet(tmp_path / "m" / "metadata" / "fhir_identifiers.parquet")
    events = pd.concat(pd.read_parquet(f) for f in (tmp_path / "m" / "data").glob("*.parquet"))
    assert set(events["subject_id"]) == set(ids["subject_id"]) and len(ids) == 5


def test_serve_without_a_task_says_which_is_missing(tmp_path):
    proc = run("serve", "--port", "3998", cwd=tmp_path, ok=False)
    assert proc.returncode == 2 and "which task?" in proc.stderr


def test_keys_are_shown_once_and_listed_without_secrets(tmp_path):
    created = run("keys", "create", "--role", "auditor", "--name", "audit-team", cwd=tmp_path)
    token = created.stdout.strip()
    assert token.startswith("tc_") and len(token) > 40
    listed = run("keys", "list", cwd=tmp_path)
    assert "audit-team" in listed.stdout and token not in listed.stdout
    assert token[:10] in listed.stdout  # the prefix identifies it
    dup = run("keys", "create", "--role", "auditor", "--name", "audit-team", cwd=tmp_path,
              ok=False)
    assert dup.returncode == 2 and "exists already" in dup.stderr
    bad = run("keys", "create", "--role", "root", "--name", "x", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and "role must be one of" in bad.stderr
    run("keys", "revoke", "--name", "audit-team", cwd=tmp_path)
    again = run("keys", "revoke", "--name", "audit-team", cwd=tmp_path, ok=False)
    assert again.returncode == 2 and "no active API key" in again.stderr
