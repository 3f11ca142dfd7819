"""A training job: training set → candidates → held-out evaluation → MLflow → gate.

Data use follows DESIGN.md's *Splits*: each horizon's model is fitted on train with early
stopping on a held-back slice of train subjects; the tuning split picks
hyperparameters, fits the calibrators and selects the best candidate; held-out only
reports and gates.  Same seed and data, same metrics.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from features.digest import dataset_digest
from features.events import open_meds
from features.labels import label_column
from features.pipeline import TrainingSetBuilder
from features.splits import subject_hash_unit
from features.task import Task
from training import metrics as M
from training.bundle import ModelBundle
from training.calibration import PlattCalibrator, monotone
from training.card import model_card
from training.censoring import CensoringSurvival, ipcw_weights
from training.cluster import ClusterData, predict_rows
from training.errors import TrainingError
from training.evaluate import EvalFrame, evaluate, flat_metrics, paired_difference
from training.hazard import HazardHorizon, HazardModel
from training.models import FAMILIES, Candidate
from training.monitoring import reference_profile, settings_of
from training.package import PREDICT_CODE, log_package
from training.plots import evaluation_plots
from training.references import evaluate_references, reference_lines, reference_metrics
from training.registry import CHAMPION, model_name
from training.search import search
from training.tracking import Tracker, code_version, package_versions
from training.trajectory import (
    TrajectoryError,
    coverage_ok,
    evaluate_target,
    fit_trajectories,
    flat_trajectory_metrics,
)

if TYPE_CHECKING:
    from distributed import Client

Log = Callable[[str], None]
DIGEST_FIELD = 32  # MLflow's dataset digest holds 36 characters: the full one is a tag
KNOWN_FAMILIES = ("lightgbm", "hazard", "logistic")
CLUSTER_ROUNDS = 1000
HIGHER_IS_BETTER = {"auroc": True, "auprc": True, "uno_c": True, "brier": False}


class TrainOptions(BaseModel):
    """How hard to search and how precisely to evaluate."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(default=8, ge=1)
    # stops the search early (the run says so); the trial count alone decides the result
    search_seconds: float | None = Field(default=None, gt=0)
    n_bootstrap: int = Field(default=200, ge=10)
    seed: int = 0
    families: list[str] = Field(default_factory=lambda: ["lightgbm", "hazard", "logistic"],
                                min_length=1)
    early_stopping_fraction: float = Field(default=0.15, gt=0, lt=0.5)

    @field_validator("families")
    @classmethod
    def _known_families(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in KNOWN_FAMILIES]
        if unknown:
            raise ValueError(f"unknown model families {unknown}: choose from "
                             f"{', '.join(KNOWN_FAMILIES)}")
        return v
    min_subgroup: int = Field(default=100, ge=1)
    promote: bool = True
    # on a Dask cluster (training.cluster): LightGBM's fixed number of rounds, cut at the
    # best one, and where the training set is written (a folder every worker sees)
    cluster_rounds: int = Field(default=CLUSTER_ROUNDS, ge=10)
    work_dir: Path | None = None


@dataclass
class CandidateResult:
    family: str
    run_id: str
    model_uri: str
    bundle: ModelBundle
    report: dict
    tuning_score: float
    heldout_risk: np.ndarray


@dataclass
class TrainResult:
    parent_run_id: str
    experiment_id: str
    data_digest: str
    candidates: dict[str, CandidateResult]
    best: str
    version: str
    promoted: bool
    reason: str
    heldout_rows: pd.DataFrame = field(repr=False)  # subject_id, prediction_time (tests)
    references: dict = field(default_factory=dict)  # the task's reference scores, held out


def _median_or_none(days: pd.Series) -> float | None:
    """Median follow-up, or None when no row has an event time (a MEDS label file)."""
    return float(days.median()) if days.notna().any() else None


def _split_frame(frame: pd.DataFrame, task: Task, options: TrainOptions) -> dict[str, pd.DataFrame]:
    split = frame["split"].astype(str).to_numpy()
    train = frame[split == "train"]
    es_u = subject_hash_unit(train["subject_id"].to_numpy(), task.split.salt + "/early-stopping")
    parts = {
        "fit": train[es_u >= options.early_stopping_fraction],
        "early_stopping": train[es_u < options.early_stopping_fraction],
        "tuning": frame[split == "tuning"],
        "held_out": frame[split == "held_out"],
    }
    for name, part in parts.items():
        if len(part) == 0:
            raise TrainingError(f"the {name} part of the data is empty: too few subjects for "
                                "the task's split settings")
    return parts


def _xy(part: pd.DataFrame, names: list[str], h: int, g: CensoringSurvival):
    y = part[label_column(h)].to_numpy(dtype=np.float64)
    w = ipcw_weights(part["event_time_days"].to_numpy(), y, h, g)
    keep = w > 0
    return part[names].to_numpy(np.float32)[keep], y[keep], w[keep]


def _fit_candidate(family: str, params: dict, parts: dict, task: Task, names: list[str],
                   seed: int, pruner_for=None, cluster: ClusterData | None = None,
                   options: TrainOptions | None = None, log: Log | None = None
                   ) -> tuple[Candidate, np.ndarray]:
    """Per-horizon models (fit part, early stopping part) and tuning calibrators; on a
    cluster, LightGBM trains there on the whole parts (``training.cluster``)."""
    if cluster is not None:
        g = cluster.censoring
    else:
        g = {k: CensoringSurvival.fit(p["event_time_days"].to_numpy(),
                                      p["event_type"].to_numpy()) for k, p in parts.items()}
    cand = Candidate(family, params)
    x_tune = parts["tuning"][names].to_numpy(np.float32)
    t_tune = parts["tuning"]["event_time_days"].to_numpy()
    cal_risk = []
    if family == "hazard":  # one model for every horizon, from the event times
        return _fit_hazard(cand, params, parts, task, names, seed, g["tuning"])
    cls = FAMILIES[family]
    on_cluster = cluster is not None and family == "lightgbm"
    for i, h in enumerate(task.horizons_days):
        if on_cluster:  # the rows stay on the workers: only the labels are checked here
            fit = parts["fit"]
            y = fit[label_column(h)].to_numpy(dtype=np.float64)
            y = y[ipcw_weights(fit["event_time_days"].to_numpy(), y, h, g["fit"]) > 0]
        else:
            x, y, w = _xy(parts["fit"], names, h, g["fit"])
            xe, ye, we = _xy(parts["early_stopping"], names, h, g["early_stopping"])
        if len(np.unique(y)) < 2:
            raise TrainingError(f"no positive (or no negative) training rows at {h} days")
        if on_cluster:
            try:
                model = cluster.fit_lightgbm(params, h, seed, options.cluster_rounds, log)
            except ValueError as exc:
                raise TrainingError(f"lightgbm on the cluster: {exc}") from None
        else:
            model = cls(params=params, seed=seed).fit(
                x, y, w, xe, ye, we, pruner=pruner_for(i) if pruner_for is not None else None)
        yt = parts["tuning"][label_column(h)].to_numpy(dtype=np.float64)
        wt = ipcw_weights(t_tune, yt, h, g["tuning"])
        raw = model.score(x_tune)
        cal = PlattCalibrator.fit(raw, np.nan_to_num(yt), wt)
        cand.models.append(model)
        cand.calibrators.append(cal)
        cal_risk.append(cal(raw))
    return cand, monotone(np.column_stack(cal_risk))


def _fit_hazard(cand: Candidate, params: dict, parts: dict, task: Task, names: list[str],
                seed: int, g_tuning: CensoringSurvival) -> tuple[Candidate, np.ndarray]:
    """The discrete-time hazard family (``training.hazard``): one model, a view and a
    calibrator per horizon."""
    if task.labels is not None:
        raise TrainingError("the hazard family needs event times, which a MEDS label file "
                            "does not carry")

    def event_data(p: pd.DataFrame):
        t = p["event_time_days"].to_numpy(np.float64)
        return p[names].to_numpy(np.float32), np.nan_to_num(t, nan=np.inf), \
            p["event_type"].to_numpy()

    x, t, e = event_data(parts["fit"])
    xe, te, ee = event_data(parts["early_stopping"])
    try:
        model = HazardModel(params, list(task.horizons_days), seed).fit(x, t, e, xe, te, ee)
    except ValueError as exc:
        raise TrainingError(f"hazard family: {exc}") from None
    x_tune = parts["tuning"][names].to_numpy(np.float32)
    t_tune = parts["tuning"]["event_time_days"].to_numpy()
    cal_risk = []
    for i, h in enumerate(task.horizons_days):
        view = HazardHorizon(model, i)
        yt = parts["tuning"][label_column(h)].to_numpy(dtype=np.float64)
        raw = view.score(x_tune)
        cal = PlattCalibrator.fit(raw, np.nan_to_num(yt), ipcw_weights(t_tune, yt, h, g_tuning))
        cand.models.append(view)
        cand.calibrators.append(cal)
        cal_risk.append(cal(raw))
    return cand, monotone(np.column_stack(cal_risk))


def _tuning_score(risk: np.ndarray, tuning: pd.DataFrame, task: Task, metric: str) -> float:
    g = CensoringSurvival.fit(tuning["event_time_days"].to_numpy(), tuning["event_type"].to_numpy())
    h = task.primary_horizon
    i = task.horizons_days.index(h)
    y = tuning[label_column(h)].to_numpy(dtype=np.float64)
    w = ipcw_weights(tuning["event_time_days"].to_numpy(), y, h, g)
    if metric == "brier":
        return float(M.brier(risk[:, i], y, w, np.ones_like(w))[0])
    if metric == "auprc":
        return float(M.auprc(risk[:, i], y, w)[0])
    return float(M.auroc(risk[:, i], y, w)[0])


def _brier_all(risk: np.ndarray, tuning: pd.DataFrame, task: Task) -> float:
    g = CensoringSurvival.fit(tuning["event_time_days"].to_numpy(), tuning["event_type"].to_numpy())
    total = 0.0
    for i, h in enumerate(task.horizons_days):
        y = tuning[label_column(h)].to_numpy(dtype=np.float64)
        w = ipcw_weights(tuning["event_time_days"].to_numpy(), y, h, g)
        total += float(M.brier(risk[:, i], y, w, np.ones_like(w))[0])
    return total / len(task.horizons_days)


def drift_reference(bundle: ModelBundle, parts: dict[str, pd.DataFrame], names: list[str],
                    x_held: np.ndarray, heldout_risk: np.ndarray, seed: int) -> dict:
    """The reference monitoring measures drift against: the training split's feature
    distributions (most important first: mean |contribution| at the primary horizon on
    up to 2,000 held-out rows) and the held-out risks."""
    task = bundle.task
    train = pd.concat([parts["fit"], parts["early_stopping"]], ignore_index=True)
    sample = np.random.default_rng(seed).permutation(x_held.shape[0])[:2000]
    primary = task.horizons_days.index(task.primary_horizon)
    importance = (np.abs(bundle.models[primary].contributions(x_held[sample])).mean(axis=0)
                  if sample.size else np.zeros(len(names)))
    return reference_profile(train[names].to_numpy(np.float32),
                             train["subject_id"].to_numpy(), names, importance,
                             heldout_risk, parts["held_out"]["subject_id"].to_numpy(),
                             task.horizons_days, top=settings_of(task).top_features,
                             seed=seed)


def _calibration_ok(report: dict, task: Task) -> tuple[bool, str]:
    lo, hi = task.promotion.calibration_slope
    problems = []
    if report.get("trajectories"):
        ok, why = coverage_ok(report["trajectories"], task)
        if not ok:
            problems.append(why)
    for h, e in report["horizons"].items():
        slope = e["rows"]["calibration_slope"]["estimate"]
        ece = e["rows"]["ece"]["estimate"]
        if not lo <= slope <= hi:
            problems.append(f"{h}-day calibration slope {slope:.3f} outside [{lo}, {hi}]")
        if ece > task.promotion.max_ece:
            problems.append(f"{h}-day ECE {ece:.4f} above {task.promotion.max_ece}")
    if problems:
        return False, "; ".join(problems)
    return True, "calibration within limits" + (
        "; trajectory coverage within limits" if report.get("trajectories") else "")


def _fit_trajectories(task: Task, parts: dict[str, pd.DataFrame], names: list[str], spec,
                      options: TrainOptions, log: Log) -> tuple[list, list]:
    """The task's trajectory models (LightGBM quantiles, conformalised on tuning) and the
    linear baseline beside them; shared by every candidate (they need no risk model)."""
    if not getattr(task, "trajectories", None):
        return [], []
    units = {c.code: c.unit for c in spec.codes}
    log(f"  trajectories: {', '.join(t.code for t in task.trajectories)} "
        "(LightGBM quantiles, conformalised on tuning; linear baseline)")
    skipped: list[str] = []
    try:
        models = fit_trajectories(task, parts, names, units, options.seed, skipped=skipped)
        baseline = fit_trajectories(task, parts, names, units, options.seed, family="linear",
                                    skipped=skipped)
    except TrajectoryError as exc:
        raise TrainingError(str(exc)) from None
    for why in skipped:
        log(f"  skipped {why}")
    if skipped:
        mlflow.set_tag("trajectories.skipped", "; ".join(skipped)[:4000])
    return models, baseline


def heldout_request(events: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The model-package input for held-out rows: their subjects' events + PREDICT_AT rows."""
    ev = events[events["subject_id"].isin(rows["subject_id"].unique())]
    ask = pd.DataFrame({"subject_id": rows["subject_id"].to_numpy(np.int64),
                        "time": rows["prediction_time"].to_numpy(), "code": PREDICT_CODE,
                        "numeric_value": np.nan, "text_value": None})
    ev = ev.assign(code=ev["code"].astype(str))[["subject_id", "time", "code", "numeric_value",
                                                  "text_value"]]
    out = pd.concat([ev, ask], ignore_index=True)
    out["numeric_value"] = out["numeric_value"].astype(np.float64)
    out["text_value"] = out["text_value"].astype(object)
    return out


def _local_data(dataset, task: Task, options: TrainOptions):
    builder = TrainingSetBuilder(dataset, task)
    spec = builder.fit_spec()
    frames = list(builder.chunks(spec))
    if not frames:
        raise TrainingError("no eligible prediction times in the data for this task")
    frame = pd.concat(frames, ignore_index=True)
    parts = _split_frame(frame, task, options)
    summary = {"rows": len(frame), "subjects": int(frame["subject_id"].nunique()),
               "rows_by_split": {k: len(v) for k, v in parts.items()},
               "positives": {h: int((frame[label_column(h)] == 1).sum())
                             for h in task.horizons_days},
               "censored": {h: int(frame[label_column(h)].isna().sum())
                            for h in task.horizons_days},
               "median_followup_days": _median_or_none(frame["event_time_days"]),
               "labels": "derived" if task.labels is None else "MEDS label file"}
    return spec, parts, summary


def _cluster_data(client, dataset, task: Task, options: TrainOptions, log: Log):
    try:
        cluster = ClusterData.build(client, dataset, task, options.early_stopping_fraction,
                                    options.work_dir, options.seed, log)
    except ValueError as exc:  # features' errors (no rows, bad data) and the cluster's
        raise TrainingError(str(exc)) from None
    counts = cluster.summary_counts
    for name, n in cluster.rows_by_part.items():
        if n == 0:
            cluster.close()
            raise TrainingError(f"the {name} part of the data is empty: too few subjects "
                                "for the task's split settings")
    times = pd.Series(np.concatenate(cluster.event_times))
    summary = {"rows": counts.rows, "subjects": counts.subjects,
               "rows_by_split": dict(cluster.rows_by_part),
               "positives": dict(counts.positives), "censored": dict(counts.censored),
               "median_followup_days": _median_or_none(times),
               "labels": "derived" if task.labels is None else "MEDS label file",
               "sampled_train_rows": {k: len(cluster.parts[k])
                                      for k in ("fit", "early_stopping")}}
    return cluster, summary


def train(events_path: str | Path, task: Task, tracker: Tracker,
          options: TrainOptions | None = None, log: Log = print,
          client: Client | None = None) -> TrainResult:
    """Run one training job and return what it did (see module docstring); on a Dask
    cluster when ``client`` is given (``training.cluster``)."""
    options = options or TrainOptions()
    dataset = open_meds(events_path)
    log(f"building the {task.name} training set from {events_path}")
    cluster = None
    if client is None:
        spec, parts, summary = _local_data(dataset, task, options)
    else:
        cluster, summary = _cluster_data(client, dataset, task, options, log)
        spec, parts = cluster.spec, cluster.parts
    try:
        return _train(events_path, dataset, task, tracker, options, log, spec, parts,
                      summary, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _train(events_path, dataset, task: Task, tracker: Tracker, options: TrainOptions,
           log: Log, spec, parts: dict[str, pd.DataFrame], summary: dict,
           cluster: ClusterData | None) -> TrainResult:
    names = spec.feature_names
    digest = dataset_digest(dataset)
    heldout = parts["held_out"]
    eval_frame = EvalFrame.from_training_rows(heldout, task.horizons_days)
    x_held = heldout[names].to_numpy(np.float32)
    name = model_name(task.name)
    exp_id = tracker.experiment_id(name)
    code = code_version()
    candidates: dict[str, CandidateResult] = {}
    with tracker.active(), tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow's hints about integer columns and ambiguous local sources do not apply
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        tmp = Path(tmp)
        parent = mlflow.start_run(experiment_id=exp_id, run_name=f"train-{task.name}")
        try:
            mlflow.set_tags({"twincast.kind": "training-job", "task": task.name,
                             "task_digest": task.digest(), "feature_spec_digest": spec.digest(),
                             "data_digest": digest, "code_version": code,
                             **package_versions()})
            mlflow.log_params({"trials": options.trials, "n_bootstrap": options.n_bootstrap,
                               "seed": options.seed, "families": ",".join(options.families),
                               "n_features": len(names)})
            ds_frame = pd.DataFrame({c: pd.Series(dtype=t) for c, t in (
                ("subject_id", "int64"), ("time", "datetime64[us]"), ("code", "str"),
                ("numeric_value", "float32"), ("text_value", "str"))})
            dataset_input = mlflow.data.from_pandas(ds_frame, source=str(Path(events_path)
                                                                         .resolve()),
                                                    name=f"{task.name}-events",
                                                    digest=digest[:DIGEST_FIELD])
            input_tags = {"twincast.sha256": digest}
            mlflow.log_input(dataset_input, context="training", tags=input_tags)
            mlflow.log_dict(json.loads(task.canonical_json()), "task.json")
            mlflow.log_dict(json.loads(spec.canonical_json()), "feature_spec.json")
            mlflow.log_dict(summary, "data_summary.json")
            families = list(options.families)
            if cluster is not None and "hazard" in families:
                # person-period rows are built in one process: not on a cluster yet
                families.remove("hazard")
                log("  hazard: skipped on a cluster (it needs person-period rows)")
                mlflow.set_tag("skipped_families", "hazard: not run on a cluster")
                if not families:
                    raise TrainingError("the hazard family does not run on a cluster: "
                                        "choose lightgbm or logistic")
            if cluster is not None:
                mlflow.set_tags({"twincast.cluster": "dask",
                                 "twincast.cluster.rounds": options.cluster_rounds})
            if task.labels is not None and "hazard" in families:
                # a label file has no event times for person-period rows
                families.remove("hazard")
                log("  hazard: skipped (a MEDS label file carries no event times)")
                mlflow.set_tag("skipped_families", "hazard: labels from a MEDS label file")
                if not families:
                    raise TrainingError("the hazard family needs event times, which a MEDS "
                                        "label file does not carry: choose another family")
            trajectories, baseline = _fit_trajectories(task, parts, names, spec, options, log)
            for family in families:
                log(f"  searching {family} ({options.trials} trials, Optuna TPE)")

                def objective(params, pruner_for, family=family):
                    cand, tune_risk = _fit_candidate(family, params, parts, task, names,
                                                     options.seed, pruner_for, cluster,
                                                     options, log)
                    return _brier_all(tune_risk, parts["tuning"], task), (cand, tune_risk)

                found = search(family, options.trials, options.seed, objective,
                               options.search_seconds)
                cand, tune_risk = found.best
                cand.search = found.trials
                if found.stopped_early:
                    log(f"  {family}: search stopped early: {found.stopped_early}")
                bundle = ModelBundle(task, spec, family, cand.params, cand.models,
                                     cand.calibrators, metadata={"data_digest": digest,
                                                                 "code_version": code},
                                     trajectories=trajectories)
                risk = bundle.predict_features(x_held)
                bundle.reference = drift_reference(bundle, parts, names, x_held, risk,
                                                   options.seed)
                report = evaluate(risk, eval_frame, task.horizons_days,
                                  n_boot=options.n_bootstrap, seed=options.seed,
                                  min_subgroup=options.min_subgroup)
                if trajectories:
                    report["trajectories"] = [
                        evaluate_target(t, heldout, x_held, risk, task.horizons_days,
                                        eval_frame.groups, options.n_bootstrap, options.seed)
                        for t in trajectories]
                    report["trajectory_baseline"] = [
                        evaluate_target(t, heldout, x_held, risk, task.horizons_days,
                                        eval_frame.groups, options.n_bootstrap, options.seed)
                        for t in baseline]
                tscore = _tuning_score(tune_risk, parts["tuning"], task,
                                       task.promotion.primary_metric)
                with mlflow.start_run(experiment_id=exp_id, run_name=family, nested=True) as run:
                    fitted = bundle.models[-1].fitted_params()
                    mlflow.log_params({f"{k}": v for k, v in fitted.items()})
                    mlflow.log_params({f"best_iteration_{h}d": getattr(m, "best_iteration_", 0)
                                       for h, m in zip(task.horizons_days, bundle.models,
                                                       strict=True)})
                    mlflow.log_metrics(flat_metrics(report))
                    if trajectories:
                        mlflow.log_metrics(flat_trajectory_metrics(report["trajectories"]))
                        mlflow.log_metrics(flat_trajectory_metrics(
                            report["trajectory_baseline"], "trajectory_baseline"))
                    mlflow.log_metric(f"tuning_{task.promotion.primary_metric}", tscore)
                    mlflow.set_tags({"twincast.kind": "candidate", "family": family,
                                     "task": task.name, "data_digest": digest,
                                     "code_version": code, "task_digest": task.digest(),
                                     "feature_spec_digest": spec.digest(),
                                     **package_versions()})
                    mlflow.log_input(dataset_input, context="training", tags=input_tags)
                    mlflow.log_dict(report, "evaluation.json")
                    mlflow.log_dict(bundle.reference, "monitoring_reference.json")
                    mlflow.log_dict({"trials": found.trials, "sampler": "optuna TPE",
                                     "seed": options.seed, "stopped_early":
                                     found.stopped_early}, "search.json")
                    mlflow.set_tags({"search.sampler": f"optuna TPE, seed {options.seed}",
                                     "search.trials_completed": found.completed,
                                     "search.trials_pruned": found.pruned,
                                     "search.stopped_early": found.stopped_early or "no"})
                    for t in found.trials:
                        if t["tuning_brier"] is not None:
                            mlflow.log_metric("search_tuning_brier", t["tuning_brier"],
                                              step=t["trial"])
                    for p in evaluation_plots(risk, eval_frame, task.horizons_days,
                                              tmp / family / "plots", f"{task.name} {family}"):
                        mlflow.log_artifact(str(p), "plots")
                    mlflow.log_text(model_card(task=task, family=family, params=cand.params,
                                               report=report, data_summary=summary,
                                               data_digest=digest, spec=spec,
                                               code_version=code), "model_card.md")
                    info = log_package(bundle, tmp / family / "package")
                    candidates[family] = CandidateResult(family, run.info.run_id,
                                                         info.model_uri, bundle, report,
                                                         tscore, risk)
                log(f"  {family}: tuning {task.promotion.primary_metric} {tscore:.4f}")
            higher = HIGHER_IS_BETTER[task.promotion.primary_metric]
            best_family = sorted(candidates.values(),
                                 key=lambda c: -c.tuning_score if higher else c.tuning_score)[0]
            mlflow.set_tag("best_candidate", best_family.family)
            try:
                references = evaluate_references(
                    task, heldout, eval_frame, best_family.heldout_risk,
                    n_boot=options.n_bootstrap, seed=options.seed,
                    units={c.code: c.unit for c in spec.codes})
            except ValueError as exc:
                raise TrainingError(f"references: {exc}") from None
            if references:
                mlflow.log_dict(references, "references.json")
                mlflow.log_metrics(reference_metrics(references))
                for line in reference_lines(references, task.promotion.primary_metric):
                    log(line)
            version, promoted, reason = _register_and_gate(
                tracker, task, best_family, eval_frame, dataset, heldout, options, name, log,
                cluster)
            mlflow.set_tags({"registered_version": version, "gate_decision":
                             "promoted" if promoted else "rejected", "gate_reason": reason[:4000]})
        finally:
            mlflow.end_run()
    return TrainResult(parent.info.run_id, exp_id, digest, candidates, best_family.family,
                       version, promoted, reason,
                       heldout[["subject_id", "prediction_time"]].reset_index(drop=True),
                       references)


def _register_and_gate(tracker: Tracker, task: Task, best: CandidateResult, eval_frame: EvalFrame,
                       dataset, heldout: pd.DataFrame, options: TrainOptions, name: str,
                       log: Log, cluster: ClusterData | None = None) -> tuple[str, bool, str]:
    reg = tracker.registry
    tags = {"task": task.name, "family": best.family,
            "data_digest": best.bundle.metadata["data_digest"],
            "code_version": best.bundle.metadata["code_version"],
            "task_digest": task.digest(), "feature_spec_digest": best.bundle.spec.digest()}
    mv = reg.register(name, best.model_uri, best.run_id, tags)
    log(f"registered {name} version {mv.version} ({best.family}) as challenger")
    cal_ok, cal_reason = _calibration_ok(best.report, task)
    champion = reg.version_by_alias(name, CHAMPION)
    metric = task.promotion.primary_metric
    h = task.primary_horizon
    if not cal_ok:
        promoted, reason = False, f"stays challenger: {cal_reason}"
    elif champion is None:
        promoted, reason = True, f"first champion: no champion to beat; {cal_reason}"
    else:
        model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
        if cluster is not None:  # scored shard by shard on the workers
            champ = predict_rows(cluster.client, dataset, model.unwrap_python_model().bundle,
                                 heldout)
        else:
            champ = model.predict(heldout_request(dataset.read_all(), heldout))
        i = task.horizons_days.index(h)
        if f"risk_{h}d" not in champ:
            promoted, reason = True, (f"champion version {champion.version} does not forecast "
                                      f"{h} days; {cal_reason}")
        else:
            diff = paired_difference(best.heldout_risk[:, i], champ[f"risk_{h}d"].to_numpy(),
                                     eval_frame, h, metric, n_boot=options.n_bootstrap,
                                     seed=options.seed + 1)
            sign = 1 if HIGHER_IS_BETTER[metric] else -1
            gain = {k: sign * v for k, v in diff.items()}
            lower = min(gain["lower"], gain["upper"])
            margin = task.promotion.margin
            desc = (f"{metric} at {h} days vs champion version {champion.version}: "
                    f"improvement {gain['estimate']:+.4f} (95% CI {lower:+.4f} to "
                    f"{max(gain['lower'], gain['upper']):+.4f}), margin {margin}")
            promoted = bool(lower > margin)
            reason = (f"beats the champion: {desc}; {cal_reason}" if promoted
                      else f"stays challenger: does not beat the champion: {desc}")
    if promoted and not options.promote:
        promoted, reason = False, f"passed the gate but promotion was switched off ({reason})"
    decision = "promoted" if promoted else "rejected"
    for key, value in (("twincast.gate.decision", decision), ("twincast.gate.reason", reason)):
        tracker.client.set_model_version_tag(name, mv.version, key, value[:4000])
        tracker.client.set_tag(best.run_id, key, value[:4000])
    if promoted:
        reg.promote(name, mv.version, actor="gate", kind="gate", reason=reason,
                    task_name=task.name, run_id=best.run_id)
    log(f"gate: {decision}: {reason}")
    return str(mv.version), promoted, reason


def candidate_summary(result: TrainResult) -> list[dict[str, Any]]:
    """Rows for a terminal table: family, horizon, key metrics with intervals."""
    rows = []
    for fam, c in result.candidates.items():
        for h, e in c.report["horizons"].items():
            m = e["rows"]
            rows.append({"family": fam, "horizon": h, **{k: m[k] for k in (
                "auroc", "auprc", "brier", "calibration_slope", "ece", "uno_c")}})
    return rows
