"""Calibration per horizon, then risks made non-decreasing across horizons.

A Platt-style calibrator maps the model's raw score to risk with a weighted logistic
regression on logit(score) (IPCW weights, fitted on the tuning split).  After each
horizon is calibrated, the cumulative maximum across horizons is taken, so a longer
horizon never shows a lower risk; evaluation sees exactly this final output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from training.metrics import _logit, recalibration


@dataclass(frozen=True)
class PlattCalibrator:
    """risk = sigmoid(intercept + slope · logit(score))."""

    intercept: float = 0.0
    slope: float = 1.0

    @classmethod
    def fit(cls, scores: np.ndarray, y: np.ndarray, w: np.ndarray) -> PlattCalibrator:
        keep = w > 0
        if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
            return cls()
        a, b = recalibration(scores[keep], y[keep], w[keep], iterations=50)
        return cls(float(a[0]), float(b[0]))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return expit(self.intercept + self.slope * _logit(scores))


def monotone(risks: np.ndarray) -> np.ndarray:
    """Non-decreasing across horizons (columns in horizon order)."""
    return np.maximum.accumulate(risks, axis=1)
