"""The model package: a self-contained MLflow pyfunc model.

Input — one DataFrame in MEDS shape that carries both the events and the prediction
times::

    subject_id     int64     the twin
    time           datetime  naive UTC; null for static facts
    code           string    e.g. LAB//EGFR; a row with code TWINCAST//PREDICT_AT asks for
                             a forecast for that subject at that time
    numeric_value  float64   nullable
    text_value     string    nullable

Output — one row per PREDICT_AT row: ``subject_id``, ``prediction_time``,
``risk_<H>d`` for every horizon (calibrated, non-decreasing across horizons) and, when
the ``contributions`` parameter is > 0, a JSON column with that many top feature
contributions per horizon (TreeSHAP, LightGBM's values, or coefficient × standardised
value, on the model's raw log-odds scale).

The package bundles the FeatureSpec, the task, the fitted models and calibrators, and the
``features``/``training`` code (``code_paths``); its input example is synthetic.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from features.events import events_from_frame
from training.bundle import ModelBundle
from training.errors import PackageError
from training.registry import BUNDLE_DIGEST_TAG

PREDICT_CODE = "TWINCAST//PREDICT_AT"
INPUT_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value")
REQUIREMENTS = ("numpy", "numba", "pandas", "pyarrow", "scikit-learn", "lightgbm", "pydantic",
                "pyyaml", "mlflow")
ROOT = Path(__file__).resolve().parents[1]


def split_request(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Events (validated, canonical) and the requested (subject, time) pairs."""
    missing = [c for c in ("subject_id", "time", "code") if c not in frame]
    if missing:
        raise PackageError(f"model input lacks column(s) {missing}; expected {INPUT_COLUMNS}")
    ask = frame["code"].astype(str) == PREDICT_CODE
    if not ask.any():
        raise PackageError(f"model input has no '{PREDICT_CODE}' row: nothing to predict")
    req = frame.loc[ask, ["subject_id", "time"]]
    if req["time"].isna().any():
        raise PackageError(f"a '{PREDICT_CODE}' row needs a time")
    events = frame.loc[~ask, [c for c in INPUT_COLUMNS if c in frame]]
    events = events_from_frame(events, source="model input")
    times = pd.to_datetime(req["time"]).to_numpy().astype("datetime64[us]").view(np.int64)
    return events, req["subject_id"].to_numpy(np.int64), times


class TwincastModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a :class:`ModelBundle`."""

    def load_context(self, context) -> None:
        self.bundle = ModelBundle.loads(Path(context.artifacts["bundle"]).read_bytes())
        # the first forecast would otherwise pay for loading (or compiling) the kernels
        predict_frame(self.bundle, synthetic_example(self.bundle))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        return predict_frame(self.bundle, model_input, int((params or {}).get("contributions", 0)))


def predict_frame(bundle: ModelBundle, frame: pd.DataFrame, contributions: int = 0) -> pd.DataFrame:
    events, sid, times = split_request(frame)
    x, risks = bundle.predict_events(events, sid, times)
    out = pd.DataFrame({"subject_id": sid,
                        "prediction_time": times.view("datetime64[us]")})
    for i, h in enumerate(bundle.horizons):
        out[f"risk_{h}d"] = risks[:, i]
    for t, q in zip(bundle.trajectory_models, bundle.predict_trajectories(x), strict=True):
        for j, level in enumerate(t.quantiles):
            out[trajectory_output(t.code, t.horizon_days, level)] = q[:, j]
    if contributions > 0:
        out["contributions"] = [json.dumps(c) for c in bundle.contributions(x, contributions)]
    return out


def trajectory_output(code: str, horizon_days: int, quantile: float) -> str:
    """The pyfunc's column of a trajectory quantile: ``LAB//EGFR_365d_q0.1``."""
    return f"{code}_{horizon_days}d_q{quantile:g}"


def synthetic_example(bundle: ModelBundle) -> pd.DataFrame:
    """A made-up two-visit history over the spec's codes (no patient data)."""
    t0, t1 = pd.Timestamp("2020-01-01T09:00"), pd.Timestamp("2020-07-01T09:00")
    rows = [(0, pd.Timestamp("1960-01-01"), "MEDS_BIRTH", None)]
    for c in bundle.spec.codes:
        if c.kind == "static":
            rows.append((0, pd.NaT, c.code, 1.0 if c.numeric else None))
        else:
            value = 1.0 if c.kind == "numeric" else None
            rows += [(0, t0, c.code, value), (0, t1, c.code, value)]
    rows.append((0, t1, PREDICT_CODE, None))
    frame = pd.DataFrame(rows, columns=["subject_id", "time", "code", "numeric_value"])
    frame["subject_id"] = frame["subject_id"].astype(np.int64)
    frame["time"] = frame["time"].astype("datetime64[us]")
    frame["numeric_value"] = frame["numeric_value"].astype(np.float64)
    frame["text_value"] = pd.Series([None] * len(frame), dtype=object)
    frame.loc[0, "text_value"] = "synthetic example"  # gives the column its string type
    return frame


def pip_requirements() -> list[str]:
    return [f"{p}=={version(p)}" for p in REQUIREMENTS]


def log_package(bundle: ModelBundle, work_dir: Path, *, name: str = "model"):
    """Log the bundle as a pyfunc model in the active MLflow run; returns ModelInfo."""
    from mlflow.models import infer_signature

    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "bundle.pkl"
    data = bundle.dumps()
    path.write_bytes(data)
    # the artifact's digest goes into the tracking store (a run tag, copied to each version
    # registered from it), not only beside the artifact: whoever can swap the artifact
    # cannot also fix its recorded digest
    mlflow.set_tag(BUNDLE_DIGEST_TAG, hashlib.sha256(data).hexdigest())
    example = synthetic_example(bundle)
    output = predict_frame(bundle, example, contributions=0)
    with warnings.catch_warnings():
        # MLflow hints that integer columns cannot hold missing values: subject_id never does
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, output, params={"contributions": 0})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"bundle": str(path)},
        code_paths=[str(ROOT / "features"), str(ROOT / "training")],
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata={"task": bundle.task.name, "family": bundle.family,
                  "horizons_days": bundle.horizons,
                  "feature_spec_digest": bundle.spec.digest(),
                  "task_digest": bundle.task.digest(),
                  "feature_names": bundle.spec.feature_names,
                  **bundle.metadata},
    )
