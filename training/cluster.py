"""Training on a Dask cluster: the data stays on the workers, LightGBM trains there.

``twincast train --scheduler …`` (:func:`training.train.train` with a client):

* the training set is built on the cluster (:mod:`features.sharded`: the same rows as in
  one process) into a parquet file in a work folder every worker sees;
* the *train* split stays on the workers: each partition is one row group of that file
  (a chunk of subjects), read there, split there into the fit part and the
  early-stopping part by the same subject hash as in one process, and given its IPCW
  weights there — features, labels and weights come from the same partition, so they
  stay aligned.  Memory per worker is its share of the training rows;
* each horizon's LightGBM model is fitted by ``lightgbm.dask``.  It has no early
  stopping, so it trains a fixed number of rounds (``TrainOptions.cluster_rounds``) with
  the early-stopping part as its ``eval_set``, and the model is cut at the best
  iteration read from ``evals_result_`` — the round the single-process fit would have
  stopped at, given the same trees.  Trees found on partitioned data differ from one
  process's (LightGBM's data-parallel histograms bin and split per machine), so the
  metrics match the single-process run within a tolerance, not bit for bit;
* a fit whose worker dies fails in LightGBM's collective; it is run again on the
  workers that are left (or have come back), up to ``FIT_ATTEMPTS`` times;
* the client holds what calibration, selection and the held-out evaluation need: the
  tuning and held-out rows (by default 30% of the rows) and the per-row predictions,
  plus a sample of at most ``SAMPLE_ROWS`` training rows for what is fitted on a sample
  — the logistic baseline (scikit-learn on a sample: it is the baseline, and dask-ml's
  GLMs would add a dependency for a model whose point is being simple), the trajectory
  quantile models and the drift reference.  The censoring distributions are fitted on
  the full parts' event times (two columns gathered).  The hazard family needs
  person-period rows and is not run on a cluster (the run says so);
* the gate's comparison with the champion scores the held-out rows with the champion's
  bundle shard by shard on the workers, instead of reading every event into the client.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.events import EventArrays, MedsDataset
from features.labels import label_column
from features.sharded import shard_of, write_training_set_on
from features.splits import subject_hash_unit
from features.task import Task
from training.bundle import ModelBundle
from training.censoring import CensoringSurvival, ipcw_weights
from training.models import LightGBMHorizon

if TYPE_CHECKING:
    from distributed import Client

SAMPLE_ROWS = 100_000
FIT_ATTEMPTS = 3
Log = Callable[[str], None]


def _read_group(args: tuple[str, int, list[str], str, float, str]) -> pd.DataFrame:
    """One partition: one row group's training rows of one part (fit or early stopping)."""
    path, group, columns, salt, fraction, part = args
    table = pq.ParquetFile(path).read_row_group(group, columns=columns)
    frame = table.filter(pc.equal(table["split"].cast("string"), "train")).to_pandas()
    u = subject_hash_unit(frame["subject_id"].to_numpy(), salt + "/early-stopping")
    keep = u < fraction if part == "early_stopping" else u >= fraction
    return frame[keep].reset_index(drop=True)


def _weighted(frame: pd.DataFrame, h: int, g: CensoringSurvival, names: list[str]
              ) -> pd.DataFrame:
    """A partition's rows observed at horizon ``h``: features, label and IPCW weight."""
    y = frame[label_column(h)].to_numpy(np.float64)
    w = ipcw_weights(frame["event_time_days"].to_numpy(), y, h, g)
    keep = w > 0
    out = frame.loc[keep, names].astype(np.float32)
    out["_y"] = y[keep]
    out["_w"] = w[keep]
    return out.reset_index(drop=True)


@dataclass
class ClusterData:
    """A training job's data when it runs on a cluster (see the module docstring)."""

    client: Client
    work: Path
    path: Path
    names: list[str]
    parts: dict[str, pd.DataFrame]  # fit and early stopping: samples; tuning, held_out: all
    censoring: dict[str, CensoringSurvival]
    rows_by_part: dict[str, int]
    summary_counts: Any
    spec: Any
    _sources: dict[str, Any]
    _persisted: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, client: Client, dataset: MedsDataset, task: Task, early_stopping: float,
              work_dir: str | None, seed: int, log: Log) -> ClusterData:
        work = Path(tempfile.mkdtemp(prefix="twincast-train-", dir=work_dir))
        path = work / "training_set.parquet"
        t0 = time.perf_counter()
        summary = write_training_set_on(client, dataset, task, path)
        log(f"  training set on the cluster: {summary.rows:,} rows in "
            f"{time.perf_counter() - t0:.1f}s")
        spec = summary.spec
        names = spec.feature_names
        held = pq.read_table(path, filters=[("split", "in", ["tuning", "held_out"])])
        held = held.to_pandas()
        split = held["split"].astype(str).to_numpy()
        parts = {"tuning": held[split == "tuning"].reset_index(drop=True),
                 "held_out": held[split == "held_out"].reset_index(drop=True)}
        columns = ["subject_id", "prediction_time", "split", "event_type", "event_time_days",
                   *[label_column(h) for h in task.horizons_days],
                   *[c for c in held.columns if c.startswith("target_")], *names]
        meta = held.iloc[:0][columns]
        groups = pq.ParquetFile(path).num_row_groups
        sources = {part: ([(str(path), g, columns, task.split.salt, early_stopping, part)
                           for g in range(groups)], meta) for part in ("fit", "early_stopping")}
        censoring: dict[str, CensoringSurvival] = {}
        rows: dict[str, int] = {}
        data = cls(client, work, path, names, parts, censoring, rows, summary, spec, sources)
        for part in ("fit", "early_stopping"):
            ddf = data.train_part(part)
            times = ddf[["event_time_days", "event_type"]].compute()
            censoring[part] = CensoringSurvival.fit(times["event_time_days"].to_numpy(),
                                                    times["event_type"].to_numpy())
            rows[part] = len(times)
            n = min(SAMPLE_ROWS, len(times))
            frac = n / max(len(times), 1)
            parts[part] = (ddf.sample(frac=frac, random_state=seed).compute()
                           if frac < 1 else ddf.compute()).reset_index(drop=True)
        for k in ("tuning", "held_out"):
            censoring[k] = CensoringSurvival.fit(parts[k]["event_time_days"].to_numpy(),
                                                 parts[k]["event_type"].to_numpy())
            rows[k] = len(parts[k])
        return data

    def train_part(self, part: str, *, fresh: bool = False):
        """The train split's fit or early-stopping part as a Dask DataFrame, a partition
        per row group, persisted on the workers (rebuilt after a worker restart)."""
        import dask.dataframe as dd

        if fresh or part not in self._persisted:
            args, meta = self._sources[part]
            self._persisted[part] = dd.from_map(_read_group, args, meta=meta,
                                                enforce_metadata=False).persist()
        return self._persisted[part]

    def close(self) -> None:
        self._persisted.clear()
        shutil.rmtree(self.work, ignore_errors=True)

    def fit_lightgbm(self, params: dict, h: int, seed: int, rounds: int,
                     log: Log | None = None) -> LightGBMHorizon:
        """One horizon's model by ``lightgbm.dask``, cut at its best iteration.

        A worker lost during the fit leaves LightGBM's other machines waiting on it for
        ever (and its pinned task with no worker to run on): a watchdog sees the worker
        go, restarts the fit's workers, and the fit runs again on rebuilt partitions, up
        to ``FIT_ATTEMPTS`` times."""
        for attempt in range(1, FIT_ATTEMPTS + 1):
            fresh = attempt > 1
            fit, es = (self._observed(part, h, fresh) for part in ("fit", "early_stopping"))
            watchdog = _Watchdog(self.client)
            try:
                model = self._fit_once(fit, es, params, seed, rounds)
                break
            except Exception as exc:
                if not watchdog.tripped:
                    raise  # not a lost worker: a real error
                if attempt == FIT_ATTEMPTS:
                    raise
                if log:
                    log(f"  lightgbm.dask fit at {h} days lost a worker "
                        f"({type(exc).__name__}); running it again "
                        f"(attempt {attempt + 1} of {FIT_ATTEMPTS})")
            finally:
                watchdog.stop()
            self.client.wait_for_workers(1, timeout=120)
        loss = np.asarray(model.evals_result_["valid_0"]["binary_logloss"])
        best = int(np.argmin(loss)) + 1  # the first round with the lowest loss
        cut = lgb.Booster(model_str=model.booster_.model_to_string(num_iteration=best))
        return LightGBMHorizon(params=params, seed=seed, booster_=cut, best_iteration_=best)

    def _observed(self, part: str, h: int, fresh: bool):
        """A part's rows observed at ``h`` with their weights; no empty partitions."""
        ddf = self.train_part(part, fresh=fresh).map_partitions(
            _weighted, h, self.censoring[part], self.names, meta=_weighted_meta(self.names))
        ddf = ddf.persist()
        lengths = ddf.map_partitions(len).compute()
        keep = [i for i, n in enumerate(lengths) if n > 0]
        if not keep:
            raise ValueError(f"no {part} rows observed at {h} days")
        return ddf.partitions[keep]

    def _fit_once(self, fit, es, params: dict, seed: int, rounds: int):
        import lightgbm.dask as ldask

        # threads: lightgbm.dask gives each worker's fit the worker's own threads
        settings = {"objective": "binary", "verbose": -1, "deterministic": True,
                    "force_row_wise": True, "seed": seed, "bagging_seed": seed,
                    "feature_fraction_seed": seed, "data_random_seed": seed, **params}
        model = ldask.DaskLGBMClassifier(client=self.client, n_estimators=rounds,
                                         time_out=2, **settings)
        model.fit(fit[self.names], fit["_y"], sample_weight=fit["_w"],
                  eval_X=(es[self.names],), eval_y=(es["_y"],),
                  eval_sample_weight=[es["_w"]], eval_metric="binary_logloss")
        return model


class _Watchdog:
    """Restarts the cluster's workers when one that was there at the start goes away
    (see :meth:`ClusterData.fit_lightgbm`)."""

    def __init__(self, client: Client, every: float = 0.5):
        self.client = client
        self.start = set(client.scheduler_info(n_workers=-1)["workers"])
        self.tripped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)
        self._thread.start()

    def lost(self) -> bool:
        return bool(self.start - set(self.client.scheduler_info(n_workers=-1)["workers"]))

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if self.lost():
                    self.tripped = True
                    self._abort()
                    return
            except Exception:  # the client closing under us: nothing to watch
                return

    def _abort(self) -> None:
        """Cancel the fit's tasks (pinned to their machines, they would wait for the lost
        one for ever: the fit then raises) and restart the workers still there (their
        LightGBM threads are blocked in its network code)."""
        from distributed import Future

        keys = self.client.run_on_scheduler(_training_keys)
        self.client.cancel([Future(k, self.client) for k in keys], force=True)
        alive = list(self.client.scheduler_info(n_workers=-1)["workers"])
        self.client.restart_workers(alive, raise_for_error=False)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _training_keys(dask_scheduler=None) -> list:
    return [k for k in dask_scheduler.tasks if str(k).startswith("_train_part")]


def _weighted_meta(names: list[str]) -> pd.DataFrame:
    meta = pd.DataFrame({n: pd.Series(dtype=np.float32) for n in names})
    meta["_y"] = pd.Series(dtype=np.float64)
    meta["_w"] = pd.Series(dtype=np.float64)
    return meta


def _predict_shard(dataset: MedsDataset, bundle: ModelBundle, path, keys: pd.DataFrame
                   ) -> pd.DataFrame:
    """The bundle's risks for the ``keys`` rows (subject_id, prediction_time, row) whose
    subjects are in one shard."""
    from features.pipeline import TrainingSetBuilder

    builder = TrainingSetBuilder(shard_of(dataset, path), bundle.task)
    out = []
    for arrays in builder.shards():
        mine = keys[keys["subject_id"].isin(np.unique(arrays.subject_id))]
        if mine.empty:
            continue
        mine = mine.sort_values(["subject_id", "prediction_time"], kind="stable")
        x = bundle.features_for(EventArrays(arrays.subject_id, arrays.time_us, arrays.code,
                                            arrays.categories, arrays.value),
                                mine["subject_id"].to_numpy(),
                                mine["prediction_time"].to_numpy().view(np.int64))
        risk = bundle.predict_features(x)
        frame = pd.DataFrame(risk, columns=[f"risk_{h}d" for h in bundle.horizons])
        frame.insert(0, "row", mine["row"].to_numpy())
        out.append(frame)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def predict_rows(client: Client, dataset: MedsDataset, bundle: ModelBundle,
                 rows: pd.DataFrame) -> pd.DataFrame:
    """``bundle``'s risks for ``rows`` (subject_id, prediction_time), in their order,
    computed shard by shard on the cluster."""
    keys = pd.DataFrame({"subject_id": rows["subject_id"].to_numpy(np.int64),
                         "prediction_time": rows["prediction_time"].to_numpy(
                             "datetime64[us]"),
                         "row": np.arange(len(rows))})
    data, model, k = client.scatter([dataset, bundle, keys], broadcast=True, hash=False)
    futures = [client.submit(_predict_shard, data, model, path, k, pure=False)
               for path in dataset.files]
    parts = [f.result() for f in futures]
    found = pd.concat([p for p in parts if len(p)], ignore_index=True)
    found = found.sort_values("row").set_index("row")
    if len(found) != len(rows):
        raise ValueError(f"{len(rows) - len(found)} rows have no events in the dataset")
    return found.reset_index(drop=True)
