"""Hyperparameter search: Optuna's TPE sampler, seeded, one trial at a time.

The number of trials decides the result: the same seed, data and trial count give the
same trials and the same winner.  A time budget only stops the search early — the run
then says how many trials it had time for.  Each trial's LightGBM models report their
early-stopping loss as they grow, and a trial whose loss is worse than the median of the
earlier trials at the same step is pruned (Optuna's median pruner: deterministic too,
as it only compares with trials already done).  Trials are scored on the tuning split
(the mean Brier score over the task's horizons); held-out data is never seen here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

STEPS_PER_HORIZON = 10_000  # a pruning step: horizon index x this + boosting round
WARMUP_ROUNDS = 30


def suggest(family: str, trial: optuna.Trial) -> dict[str, Any]:
    """A configuration of ``family`` from its search space."""
    if family in ("lightgbm", "hazard"):
        return {
            "num_leaves": trial.suggest_int("num_leaves", 7, 127, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 10, 400, log=True),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 30.0, log=True),
        }
    if family == "logistic":
        return {"C": trial.suggest_float("C", 1e-3, 10.0, log=True)}
    raise ValueError(f"no search space for family {family!r}")


class Pruner:
    """What a trial's models call as they train: report the loss, stop if pruned."""

    def __init__(self, trial: optuna.Trial, horizon_index: int):
        self.trial, self.offset = trial, horizon_index * STEPS_PER_HORIZON

    def __call__(self, round_: int, loss: float) -> None:
        step = self.offset + round_
        self.trial.report(loss, step)
        # no pruning in a horizon's first rounds (every horizon: the pruner's own warm-up
        # would count the first one only)
        if round_ >= WARMUP_ROUNDS and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at boosting round {round_}")


@dataclass
class SearchResult:
    best: Any  # what the objective returned for the best trial
    trials: list[dict[str, Any]]  # every trial: number, state, params, score
    completed: int
    pruned: int
    stopped_early: str | None  # why the search ended before its trials, or None


def search(family: str, trials: int, seed: int,
           objective: Callable[[dict[str, Any], Callable[[int], Pruner]], tuple[float, Any]],
           budget_seconds: float | None = None) -> SearchResult:
    """Run ``trials`` trials of ``objective(params, pruner_for_horizon)`` → (score to
    minimise, payload); returns the best payload and the trial table."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                           n_startup_trials=min(10, max(trials // 3, 2))),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    payloads: dict[int, Any] = {}
    rows: list[dict[str, Any]] = []
    start = time.monotonic()

    def run(trial: optuna.Trial) -> float:
        params = suggest(family, trial)
        t0 = time.monotonic()
        try:
            score, payload = objective(params, lambda i: Pruner(trial, i))
        except optuna.TrialPruned:
            rows.append({"trial": trial.number, "state": "pruned", **params,
                         "tuning_brier": None, "seconds": time.monotonic() - t0})
            raise
        if not payloads or score < payloads["score"]:  # only the best so far is kept
            payloads.update(score=score, trial=trial.number, payload=payload)
        rows.append({"trial": trial.number, "state": "complete", **params,
                     "tuning_brier": score, "seconds": time.monotonic() - t0})
        return score

    study.optimize(run, n_trials=trials, timeout=budget_seconds, catch=())
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"every {family} trial was pruned or failed")
    stopped = None
    if len(study.trials) < trials:
        stopped = (f"time budget of {budget_seconds:g} s reached after {len(study.trials)} "
                   f"of {trials} trials ({time.monotonic() - start:.0f} s)")
    return SearchResult(payloads["payload"], rows, len(done),
                        sum(r["state"] == "pruned" for r in rows), stopped)
