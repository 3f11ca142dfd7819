"""The model bundle: FeatureSpec, task, per-horizon models and calibrators in one object.

The same ``predict_features`` serves held-out evaluation, the MLflow pyfunc and the
service, so what is evaluated is exactly what is served.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from features.events import EventArrays, shortest_f32
from features.featurize import build_features
from features.spec import FeatureSpec
from features.task import Task
from training.calibration import monotone

RAW_SCALE = "log-odds of the uncalibrated model score"


@dataclass
class ModelBundle:
    task: Task
    spec: FeatureSpec
    family: str
    params: dict[str, Any]
    models: list[Any]
    calibrators: list[Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    # what monitoring measures drift against (training.monitoring.reference_profile);
    # None in bundles trained before monitoring
    reference: dict[str, Any] | None = None
    # the task's trajectory models (training.trajectory), one per (code, horizon); empty
    # in bundles trained before trajectories
    trajectories: list[Any] = field(default_factory=list)

    @property
    def horizons(self) -> list[int]:
        return list(self.task.horizons_days)

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        return np.column_stack([m.score(x) for m in self.models])

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Final risks (rows × horizons): calibrated per horizon, then non-decreasing."""
        raw = self.raw_scores(x)
        cal = np.column_stack([c(raw[:, i]) for i, c in enumerate(self.calibrators)])
        return monotone(cal)

    def predict_trajectories(self, x: np.ndarray) -> list[np.ndarray]:
        """Per trajectory model (``trajectory_models`` order): rows × its quantiles."""
        return [t.predict(x) for t in self.trajectory_models]

    @property
    def trajectory_models(self) -> list[Any]:
        return self.__dict__.get("trajectories") or []

    def features_for(self, arrays: EventArrays, subject_ids: np.ndarray,
                     times_us: np.ndarray) -> np.ndarray:
        return build_features(arrays, subject_ids, times_us, self.spec)

    def predict_events(self, events: pd.DataFrame, subject_ids: np.ndarray,
                       times_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features and risks for prediction times, from canonical events."""
        x = self.features_for(EventArrays.from_events(events), subject_ids, times_us)
        return x, self.predict_features(x)

    def contributions(self, x: np.ndarray, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top ``top_k`` feature contributions per row, for every horizon."""
        per_h = [m.contributions(x) for m in self.models]
        names = self.spec.feature_names
        out = []
        for r in range(x.shape[0]):
            picks = []  # (horizon, feature, contribution), each horizon's largest first
            for h, contrib in zip(self.horizons, per_h, strict=True):
                top = np.argsort(-np.abs(contrib[r]), kind="stable")[:top_k]
                picks += [(h, int(j), float(contrib[r, j])) for j in top if contrib[r, j] != 0]
            # 88.1, as measured, not 88.0999984741211 (only the values shown)
            values = shortest_f32(x[r, [j for _, j, _ in picks]]) if picks else []
            items = [{"horizon_days": h, "feature": names[j], "value": v, "contribution": c,
                      "scale": RAW_SCALE} for (h, j, c), v in zip(picks, values, strict=True)]
            out.append(items)
        return out

    def dumps(self) -> bytes:
        return pickle.dumps(self, protocol=5)

    @staticmethod
    def loads(data: bytes) -> ModelBundle:
        bundle = pickle.loads(data)
        for m in bundle.models:  # tree walks and explanation tables: built at load,
            for build in ("predictor", "explainer"):  # not on a request
                if hasattr(m, build):
                    getattr(m, build)()
        for t in bundle.trajectory_models:
            t.prepare()
        return bundle

    def digest(self) -> str:
        return hashlib.sha256(self.dumps()).hexdigest()
