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
  the early-stopping part as its ``eval_set``, and is then cut where LightGBM's
  ``early_stopping(50)`` would have stopped it: on the loss curve of the *whole*
  early-stopping part, computed per partition and summed (``lightgbm.dask``'s own
  ``evals_result_`` covers only the first machine's share of the eval set).  Trees found
  on partitioned data differ from one process's (each machine bins and sums its own
  histograms), so the metrics match the single-process run within a tolerance, not bit
  for bit;
* a fit whose worker dies would wait in LightGBM's collective for ever: it is cancelled,
  its other workers restarted, and it runs again once the cluster is back, up to
  ``FIT_ATTEMPTS`` times;
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

from features.cluster import check_visible, cluster_error, keep, map_shards
from features.events import EventArrays, MedsDataset
from features.labels import label_column
from features.pipeline import TrainingSetSummary
from features.sharded import shard_of, write_training_set_on
from features.spec import FeatureSpec
from features.splits import subject_hash_unit
from features.task import Task
from training.bundle import ModelBundle
from training.censoring import CensoringSurvival, ipcw_weights
from training.errors import TrainingError
from training.models import LightGBMHorizon
from training.scoring import risk_column

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
    summary_counts: TrainingSetSummary
    spec: FeatureSpec
    event_times: list[np.ndarray]  # every row's event time, for the data summary
    sources: dict[str, tuple[list, pd.DataFrame]]  # how each train part is read
    _persisted: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, client: Client, dataset: MedsDataset, task: Task, early_stopping: float,
              work_dir: Path | None, seed: int, log: Log) -> ClusterData:
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="twincast-train-", dir=work_dir))
        try:
            check_visible(client, work, dataset.root)
            return cls._build(client, work, dataset, task, early_stopping, seed, log)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    @classmethod
    def _build(cls, client: Client, work: Path, dataset: MedsDataset, task: Task,
               early_stopping: float, seed: int, log: Log) -> ClusterData:
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
        data = cls(client, work, path, names, parts, {}, {}, summary, spec, [], sources)
        for part in ("fit", "early_stopping"):
            ddf = data.train_part(part)
            times = ddf[["event_time_days", "event_type"]].compute()
            data.censoring[part] = CensoringSurvival.fit(times["event_time_days"].to_numpy(),
                                                         times["event_type"].to_numpy())
            data.rows_by_part[part] = len(times)
            data.event_times.append(times["event_time_days"].to_numpy())
            n = min(SAMPLE_ROWS, len(times))
            frac = n / max(len(times), 1)
            parts[part] = (ddf.sample(frac=frac, random_state=seed).compute()
                           if frac < 1 else ddf.compute()).reset_index(drop=True)
        for k in ("tuning", "held_out"):
            data.censoring[k] = CensoringSurvival.fit(parts[k]["event_time_days"].to_numpy(),
                                                      parts[k]["event_type"].to_numpy())
            data.rows_by_part[k] = len(parts[k])
            data.event_times.append(parts[k]["event_time_days"].to_numpy())
        return data

    def train_part(self, part: str, *, fresh: bool = False):
        """The train split's fit or early-stopping part as a Dask DataFrame, a partition
        per row group, persisted on the workers (rebuilt after a worker restart)."""
        import dask.dataframe as dd

        if fresh or part not in self._persisted:
            args, meta = self.sources[part]
            self._persisted[part] = dd.from_map(_read_group, args, meta=meta,
                                                enforce_metadata=False).persist()
        return self._persisted[part]

    def close(self) -> None:
        self._persisted.clear()
        shutil.rmtree(self.work, ignore_errors=True)

    def fit_lightgbm(self, params: dict, h: int, seed: int, rounds: int,
                     log: Log | None = None) -> LightGBMHorizon:
        """One horizon's model by ``lightgbm.dask``, cut where early stopping would have
        stopped it on the *whole* early-stopping part.

        ``lightgbm.dask`` reports the eval loss of the first machine's share of the eval
        set only, so the loss of every round is computed here over every partition
        (:func:`_round_losses`, reduced on the client) and the cut is the one LightGBM's
        ``early_stopping(50)`` makes on that curve.

        A worker lost during the fit leaves LightGBM's other machines waiting on it for
        ever, and its pinned task with no worker to run on: a watchdog sees the worker
        go and cancels this fit's tasks; the fit's remaining workers are restarted and
        the fit runs again on rebuilt partitions, up to ``FIT_ATTEMPTS`` times."""
        for attempt in range(1, FIT_ATTEMPTS + 1):
            fresh = attempt > 1
            fit, es = (self._observed(part, h, fresh) for part in ("fit", "early_stopping"))
            watchdog = _Watchdog(self.client)
            try:
                model = self._fit_once(fit, es, params, seed, rounds)
                break
            except Exception as exc:
                # a survivor's socket error can come before the watchdog's next look
                if not watchdog.confirm() or attempt == FIT_ATTEMPTS:
                    raise cluster_error(exc) from exc  # a real error, or out of tries
                if log:
                    log(f"  lightgbm.dask fit at {h} days lost a worker "
                        f"({type(exc).__name__}); running it again "
                        f"(attempt {attempt + 1} of {FIT_ATTEMPTS})")
            finally:
                watchdog.stop()
            watchdog.recover()
        model_str = model.booster_.model_to_string()
        parts = es.map_partitions(_round_losses, model_str, self.names,
                                  meta=(None, "f8")).to_delayed()
        sums = np.sum([np.asarray(p) for p in self.client.compute(parts, sync=True)], axis=0)
        best = early_stopping_round(sums[:-1] / sums[-1])
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


PATIENCE = 50  # LightGBMHorizon's early_stopping(50)


def early_stopping_round(losses: np.ndarray, patience: int = PATIENCE) -> int:
    """The number of rounds LightGBM's ``early_stopping(patience)`` keeps, given the
    eval loss after each round: the first best round, once ``patience`` rounds have
    brought no strict improvement (or the last round was reached)."""
    best, best_i = np.inf, 0
    for i, loss in enumerate(losses):
        if loss < best:
            best, best_i = loss, i
        elif i - best_i >= patience:
            break
    return best_i + 1


def _round_losses(frame: pd.DataFrame, model_str: str, names: list[str]) -> np.ndarray:
    """One partition's weighted binary log loss after every round, summed (not
    averaged), then its total weight: partitions add up to the whole set's curve."""
    booster = lgb.Booster(model_str=model_str)
    x = frame[names].to_numpy(np.float32)
    y, w = frame["_y"].to_numpy(np.float64), frame["_w"].to_numpy(np.float64)
    leaves = np.asarray(booster.predict(x, pred_leaf=True, num_threads=1), dtype=np.int64)
    leaves = leaves.reshape(len(frame), -1)
    raw = np.zeros(len(frame))
    out = np.empty(leaves.shape[1] + 1)
    for t in range(leaves.shape[1]):  # a tree's leaf values, then the running score
        values = np.array([booster.get_leaf_output(t, j)
                           for j in range(int(leaves[:, t].max()) + 1)])
        raw += values[leaves[:, t]]
        p = np.clip(1.0 / (1.0 + np.exp(-raw)), 1e-15, 1 - 1e-15)  # LightGBM's clip
        out[t] = float(np.sum(w * -(y * np.log(p) + (1 - y) * np.log(1 - p))))
    out[-1] = w.sum()
    return out


class _Watchdog:
    """Cancels this client's LightGBM fit when a worker that was there at its start goes
    away (:meth:`ClusterData.fit_lightgbm`); :meth:`recover` then restarts the fit's
    other workers.  Workers are told apart by their ids, so one that comes back on the
    same address is still seen as lost."""

    def __init__(self, client: Client, every: float = 0.5):
        self.client = client
        self.start = self._ids()
        self.tripped = False
        self.busy: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)
        self._thread.start()

    def _ids(self) -> dict[str, str]:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return {a: str(w.get("id")) for a, w in workers.items()}

    def _mine(self) -> list:
        return [k for k in self.client.futures if str(k).startswith("_train_part")]

    def _lost(self) -> bool:
        now = self._ids()
        return not all(now.get(a) == i for a, i in self.start.items())

    def _abort(self) -> None:
        from distributed import Future

        mine = set(self._mine())
        self.busy = [w for w, keys in self.client.processing().items() if mine & set(keys)]
        self.tripped = True
        self.client.cancel([Future(k, self.client) for k in mine], force=True)

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if self._lost():
                    self._abort()
                    return
            except Exception:  # the client closing under us: nothing to watch
                return

    def confirm(self, wait: float = 10.0) -> bool:
        """After a failed fit: whether a worker was lost (the scheduler may take a few
        seconds to see a killed one go), cancelling the fit's tasks if so."""
        self.stop()
        deadline = time.monotonic() + wait
        while not self.tripped:
            if self._lost():
                self._abort()
            elif time.monotonic() > deadline:
                return False
            else:
                time.sleep(0.25)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def recover(self) -> None:
        """Restart the fit's workers still there (their LightGBM threads are blocked in
        its network code) and wait for the cluster to be back at its size."""
        alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
        stuck = [w for w in self.busy if w in alive]
        if stuck:
            self.client.restart_workers(stuck, raise_for_error=False)
        try:
            self.client.wait_for_workers(len(self.start), timeout=120)
        except TimeoutError:
            self.client.wait_for_workers(1, timeout=120)


def _weighted_meta(names: list[str]) -> pd.DataFrame:
    meta = pd.DataFrame({n: pd.Series(dtype=np.float32) for n in names})
    meta["_y"] = pd.Series(dtype=np.float64)
    meta["_w"] = pd.Series(dtype=np.float64)
    return meta


def _predict_shard(path, dataset: MedsDataset, bundle: ModelBundle, keys: pd.DataFrame
                   ) -> pd.DataFrame:
    """The bundle's risks for the ``keys`` rows (subject_id, prediction_time, row) whose
    subjects are in one shard."""
    arrays = EventArrays.from_events(shard_of(dataset, path).read_file(path))
    mine = keys[keys["subject_id"].isin(np.unique(arrays.subject_id))]
    if mine.empty:
        return pd.DataFrame()
    mine = mine.sort_values(["subject_id", "prediction_time"], kind="stable")
    x = bundle.features_for(arrays, mine["subject_id"].to_numpy(),
                            mine["prediction_time"].to_numpy().view(np.int64))
    frame = pd.DataFrame(bundle.predict_features(x),
                         columns=[risk_column(h) for h in bundle.horizons])
    frame.insert(0, "row", mine["row"].to_numpy())
    return frame


def predict_rows(client: Client, dataset: MedsDataset, bundle: ModelBundle,
                 rows: pd.DataFrame) -> pd.DataFrame:
    """``bundle``'s risks for ``rows`` (subject_id, prediction_time), in their order,
    computed shard by shard on the cluster."""
    keys = pd.DataFrame({"subject_id": rows["subject_id"].to_numpy(np.int64),
                         "prediction_time": rows["prediction_time"].to_numpy(
                             "datetime64[us]"),
                         "row": np.arange(len(rows))})
    parts = [p for _, p in map_shards(client, _predict_shard, dataset.files,
                                      keep(client, dataset), keep(client, bundle),
                                      keep(client, keys)) if len(p)]
    found = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"row": []})
    if len(found) != len(rows):
        raise TrainingError(f"{len(rows) - len(found)} held-out rows have no events in "
                            "the dataset")
    return found.sort_values("row").set_index("row").reset_index(drop=True)
