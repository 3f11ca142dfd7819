"""The hyperparameter search: seeded and deterministic, the trial count decides the
result, weak trials are pruned on the loss their models report, and a time budget only
stops the search early and says so."""

from __future__ import annotations

import math
import time

from training.search import search


def objective(params, pruner_for, pause: float = 0.0):
    """A stand-in for fitting: the loss is lowest near learning rate 0.05 and 31 leaves,
    reported as a boosting model reports its early-stopping loss while it grows."""
    time.sleep(pause)
    loss = ((math.log(params["learning_rate"]) - math.log(0.05)) ** 2
            + (params["num_leaves"] - 31) ** 2 / 1000 + params["lambda_l2"] / 300)
    for i in range(2):  # two horizons
        report = pruner_for(i)
        for r in range(10, 201, 10):
            report(r, loss * (1 + 5 / r))
    return loss, dict(params)


def _table(result):
    return [{k: v for k, v in t.items() if k != "seconds"} for t in result.trials]


def test_the_same_seed_and_trial_count_give_the_same_search():
    a, b = search("lightgbm", 20, 3, objective), search("lightgbm", 20, 3, objective)
    assert _table(a) == _table(b) and a.best == b.best
    assert len(a.trials) == 20 and a.completed + a.pruned == 20 and a.stopped_early is None
    assert a.pruned > 0  # trials worse than the median at the same step stop early
    assert _table(search("lightgbm", 20, 4, objective)) != _table(a)
    done = [t for t in a.trials if t["state"] == "complete"]
    assert a.best == {k: v for k, v in min(done, key=lambda t: t["tuning_brier"]).items()
                      if k in a.best}


def test_a_time_budget_stops_the_search_early_and_says_so():
    out = search("lightgbm", 50, 0, lambda p, f: objective(p, f, pause=0.2),
                 budget_seconds=1.0)
    assert 1 <= len(out.trials) < 50
    assert out.stopped_early and "of 50 trials" in out.stopped_early
