"""Candidate model families: one binary model per horizon, fitted with IPCW weights.

Each horizon's model sees the rows observed at that horizon (censored rows weigh 0;
competing events are negatives, never censored) and returns a raw score in (0, 1) that
a calibrator then maps to risk.  LightGBM runs deterministically (fixed threads,
``deterministic=True``), so a model version reproduces its forecasts bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightgbm as lgb
import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from training.treepredict import TreePredictor
from training.treeshap import TreeShap

LGB_THREADS = 2  # fixed, so training reproduces on any machine


@dataclass
class LightGBMHorizon:
    """A LightGBM binary model with early stopping on a held-back slice of train."""

    params: dict[str, Any]
    seed: int = 0
    booster_: lgb.Booster | None = None
    best_iteration_: int = 0

    family: ClassVar[str] = "lightgbm"  # its search space: training.search

    def fit(self, x, y, w, x_es, y_es, w_es, pruner=None) -> LightGBMHorizon:
        """``pruner``: called with (round, early-stopping loss) every 10 rounds; it may
        stop the fit by raising (a search's pruned trial)."""
        params = {
            "objective": "binary", "verbose": -1, "deterministic": True,
            "force_row_wise": True, "num_threads": LGB_THREADS, "seed": self.seed,
            "bagging_seed": self.seed, "feature_fraction_seed": self.seed,
            "data_random_seed": self.seed, **self.params,
        }
        train = lgb.Dataset(x, y, weight=w, free_raw_data=True)
        valid = lgb.Dataset(x_es, y_es, weight=w_es, reference=train)
        callbacks = [lgb.early_stopping(50, verbose=False)]
        if pruner is not None:
            def report(env) -> None:
                if env.iteration % 10 == 9:
                    pruner(env.iteration + 1, env.evaluation_result_list[0][2])
            callbacks.append(report)
        self.booster_ = lgb.train(
            params, train, num_boost_round=2000, valid_sets=[valid], callbacks=callbacks,
        )
        self.best_iteration_ = int(self.booster_.best_iteration or self.booster_.num_trees())
        # keep only the trees that are used, so predict needs no iteration argument
        self.booster_ = lgb.Booster(
            model_str=self.booster_.model_to_string(num_iteration=self.best_iteration_))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """The probability: LightGBM's, from a compiled walk of the same trees
        (:mod:`training.treepredict`, equal bit for bit, without its ~0.2 ms set-up per
        call) when the model allows, else from the booster."""
        walk = self.predictor()
        if walk is not None:
            return walk.predict(x)
        return self.booster_.predict(x, num_threads=1)

    def predictor(self) -> TreePredictor | None:
        """The tree walk, built once per loaded model (not pickled)."""
        if "_walk" not in self.__dict__:
            walk = TreePredictor.from_booster(self.booster_)
            if walk is not None:  # compiled (or its cache loaded) now, not on a request
                walk.predict(np.zeros((1, walk.n_features), dtype=np.float32))
            self.__dict__["_walk"] = walk
        return self.__dict__["_walk"]

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Per-feature contributions on the raw (log-odds) scale, bias dropped: LightGBM's
        TreeSHAP values, from :mod:`training.treeshap` (tables, deep leaves per row), or
        from the booster itself for a model with categorical splits."""
        shap = self.explainer()
        if shap is not None:
            return shap.contributions(x)
        return self.booster_.predict(x, pred_contrib=True, num_threads=1)[:, :-1]

    def explainer(self) -> TreeShap | None:
        """The TreeSHAP explainer, built once per loaded model (not pickled)."""
        if "_shap" not in self.__dict__:
            self.__dict__["_shap"] = TreeShap.from_booster(self.booster_)
        return self.__dict__["_shap"]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_shap", "_walk")}

    def fitted_params(self) -> dict[str, Any]:
        return {**self.params, "best_iteration": self.best_iteration_}


@dataclass
class LogisticHorizon:
    """Median imputation (with missing indicators), scaling and L2 logistic regression."""

    params: dict[str, Any]
    seed: int = 0
    pipeline_: Pipeline | None = None
    n_features_: int = 0

    family: ClassVar[str] = "logistic"

    def fit(self, x, y, w, x_es=None, y_es=None, w_es=None, pruner=None) -> LogisticHorizon:
        self.n_features_ = x.shape[1]
        self.pipeline_ = Pipeline([
            ("impute", SimpleImputer(strategy="median", add_indicator=True,
                                     keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("model", LogisticRegression(C=self.params["C"], max_iter=2000)),
        ])
        self.pipeline_.fit(x, y, model__sample_weight=w)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.pipeline_.predict_proba(x)[:, 1]

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Coefficient × standardised value (log-odds scale); a missing-value indicator's
        share is added to its feature."""
        z = self.pipeline_[:-1].transform(x)
        coef = self.pipeline_[-1].coef_[0]
        parts = z * coef
        out = parts[:, : self.n_features_].copy()
        indicator = self.pipeline_.named_steps["impute"].indicator_
        if indicator is not None:
            out[:, indicator.features_] += parts[:, self.n_features_:]
        return out

    def fitted_params(self) -> dict[str, Any]:
        return dict(self.params)


FAMILIES = {"lightgbm": LightGBMHorizon, "logistic": LogisticHorizon}


@dataclass
class Candidate:
    """One family's chosen configuration: a model and a calibrator per horizon."""

    family: str
    params: dict[str, Any]
    models: list[Any] = field(default_factory=list)
    calibrators: list[Any] = field(default_factory=list)
    search: list[dict[str, Any]] = field(default_factory=list)
