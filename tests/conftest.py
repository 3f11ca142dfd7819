"""Shared factories: small real data (the synthetic cohort, the PBC data) for every test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parents[1]
PBC_MEDS = ROOT / "examples" / "pbc" / "meds"
PBC_TASK = ROOT / "examples" / "pbc" / "task.yaml"
ESKD_TASK = ROOT / "examples" / "tasks" / "eskd.yaml"


@pytest.fixture(scope="session")
def small_cohort() -> pd.DataFrame:
    """400 synthetic CKD patients (canonical MEDS events)."""
    from features.simulate import simulate_cohort

    return simulate_cohort(400, seed=7)


@pytest.fixture(scope="session")
def small_cohort_dir(tmp_path_factory, small_cohort) -> Path:
    from features.events import write_meds
    from features.simulate import CODES

    return write_meds(small_cohort, tmp_path_factory.mktemp("cohort") / "meds", codes=CODES,
                      shard_subjects=150)


@pytest.fixture(scope="session")
def eskd_task():
    from features.task import load_task

    return load_task(ESKD_TASK)


@pytest.fixture(scope="session")
def pbc_task():
    from features.task import load_task

    return load_task(PBC_TASK)


def make_events(rows: list[tuple]) -> pd.DataFrame:
    """Canonical events from (subject_id, time or None, code, value or None) tuples."""
    from features.events import events_from_frame

    frame = pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], dtype=np.int64),
            "time": pd.to_datetime([r[1] for r in rows]).astype("datetime64[us]"),
            "code": [r[2] for r in rows],
            "numeric_value": np.array([np.nan if r[3] is None else r[3] for r in rows],
                                      dtype=np.float64),
        }
    )
    return events_from_frame(frame, source="test")
