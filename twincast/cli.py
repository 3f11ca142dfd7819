"""The ``twincast`` command line."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from features.errors import FeaturesError
from serving.offline import go_offline

if TYPE_CHECKING:
    from twincast.settings import Settings

app = typer.Typer(help="twincast: digital twins with live, traceable risk forecasts.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
import_app = typer.Typer(help="Convert other formats to MEDS.", no_args_is_help=True)
app.add_typer(import_app, name="import")
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)


CLUSTER_ROUNDS = 1000  # training.train.CLUSTER_ROUNDS (not imported: it loads MLflow)
SchedulerOption = Annotated[str | None, typer.Option(
    help="run on a Dask cluster: local, local:N (N worker processes) or tcp://HOST:PORT "
         "(default: TWINCAST_DASK_SCHEDULER, else this process)")]


def _settings() -> Settings:
    """The settings, imported when a command needs them (``twincast features`` does not:
    pydantic-settings and the service's configuration cost a sixth of a second)."""
    from twincast.settings import Settings

    return Settings()


@app.callback()
def _main() -> None:
    go_offline()


@contextlib.contextmanager
def _errors():
    """Map twincast's errors to a one-line message and exit status 2."""
    try:
        yield
    except (FeaturesError, FileExistsError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _progress(description: str, total: int | None):
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False,
                    disable=not sys.stderr.isatty())


@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Option("--out", help="MEDS directory to write")],
    subjects: Annotated[int, typer.Option(min=1, help="number of patients")] = 2000,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    shard_subjects: Annotated[int | None, typer.Option(min=1, help=(
        "patients per data file of the unsharded cohort (default 10,000)"))] = None,
    shards: Annotated[int | None, typer.Option(min=1, help=(
        "simulate K shards of contiguous ids, each on its own (its seed from --seed and "
        "its index), one data file each: memory bounded by one shard; another K is "
        "another cohort, and none is the unsharded one"))] = None,
    scheduler: Annotated[str | None, typer.Option(help=(
        "with --shards, simulate them on Dask: local, local:N or tcp://HOST:PORT "
        "(default: $TWINCAST_DASK_SCHEDULER, else this process); the same bytes"))] = None,
    first_subject_id: Annotated[int, typer.Option(min=0, help="the first patient's id")] = 1,
    shift: Annotated[str | None, typer.Option(help=(
        "a documented change from a date on, KIND:FACTOR@YYYY-MM-DD: egfr_assay:1.15@2021-01-01 "
        "(the eGFR assay reads 15% high from 2021); for monitoring demos"))] = None,
    steady: Annotated[bool, typer.Option(help=(
        "an open cohort in a steady state (enrolment 1990-2024): every calendar window "
        "alike, as monitoring's false-alarm rate is measured on"))] = False,
    overwrite: bool = False,
) -> None:
    """Write a synthetic CKD cohort (the embedded default) as a MEDS directory."""
    from features.cluster import SchedulerError, connect, from_environment
    from features.events import write_meds
    from features.simulate import CODES, ShardPlan, Shift, simulate_cohort, write_sharded_cohort

    with _errors():
        try:
            change = None if shift is None else Shift.parse(shift)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--shift") from None
        note = f" (shift {change.describe()})" if change else ""
        t0 = time.perf_counter()
        if shards is None:
            if scheduler is not None:
                raise typer.BadParameter("needs --shards (the unsharded cohort is simulated "
                                         "in this process)", param_hint="--scheduler")
            events = simulate_cohort(subjects, seed=seed, first_subject_id=first_subject_id,
                                     shift=change, steady=steady)
            version = f"subjects={subjects},seed={seed}" + (
                f",first={first_subject_id}" if first_subject_id != 1 else "") + (
                f",shift={shift}" if change else "") + (",steady" if steady else "")
            write_meds(events, out_dir, shard_subjects=shard_subjects or 10_000, codes=CODES,
                       overwrite=overwrite, dataset={
                           "dataset_name": "twincast-synthetic-ckd",
                           "dataset_version": version})
            console.print(f"wrote {len(events):,} events of {subjects:,} subjects to "
                          f"{out_dir} in {time.perf_counter() - t0:.1f}s{note}")
            return
        if shard_subjects is not None:
            raise typer.BadParameter("is for the unsharded cohort: with --shards each shard "
                                     "is one data file", param_hint="--shard-subjects")
        try:
            plan = ShardPlan(subjects, shards, seed=seed, first_subject_id=first_subject_id,
                             shift=change, steady=steady)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        try:
            where = from_environment(scheduler)
            with connect(where) as client, _progress("simulating", shards) as bar:
                job = bar.add_task(f"simulating {shards:,} shards", total=shards)
                events_written = write_sharded_cohort(
                    out_dir, plan, overwrite=overwrite, client=client,
                    progress=lambda _: bar.advance(job))
        except SchedulerError as exc:
            raise typer.BadParameter(str(exc), param_hint="--scheduler") from None
        on = f" on {where.describe()}" if where else ""
        console.print(f"wrote {events_written:,} events of {subjects:,} subjects in "
                      f"{shards:,} shard{'s' * (shards != 1)} to {out_dir} in "
                      f"{time.perf_counter() - t0:.1f}s"
                      f"{on}{note}", soft_wrap=True)


@import_app.command("csv")
def import_csv(
    path: Annotated[Path, typer.Argument(help="long CSV: subject_id,time,code,numeric_value"
                                              "[,text_value]")],
    out_dir: Annotated[Path, typer.Option("--out", help="MEDS directory to write")],
    overwrite: bool = False,
) -> None:
    """Import a long CSV file (one event per line) as MEDS."""
    from features.events import write_meds
    from features.importers import import_long_csv

    with _errors():
        events = import_long_csv(path)
        write_meds(events, out_dir, overwrite=overwrite)
        console.print(f"imported {len(events):,} events of "
                      f"{events['subject_id'].nunique():,} subjects to {out_dir}")


@import_app.command("wide")
def import_wide_cmd(
    path: Annotated[Path, typer.Argument(help="wide per-visit table (CSV or parquet)")],
    mapping: Annotated[Path, typer.Option(help="YAML: subject_id, time and column → code")],
    out_dir: Annotated[Path, typer.Option("--out", help="MEDS directory to write")],
    overwrite: bool = False,
) -> None:
    """Import a wide per-visit table as MEDS, given a column-to-code mapping."""
    import pandas as pd

    from features.events import write_meds
    from features.importers import WideMapping, import_wide

    with _errors():
        m = WideMapping.load(mapping)
        events = import_wide(path, m)
        codes = pd.DataFrame({"code": sorted(set(events["code"].astype(str)))})
        codes["unit"] = codes["code"].map(m.units())
        write_meds(events, out_dir, codes=codes, overwrite=overwrite)
        console.print(f"imported {len(events):,} events of "
                      f"{events['subject_id'].nunique():,} subjects to {out_dir}")


@import_app.command("fhir")
def import_fhir(
    inputs: Annotated[list[Path], typer.Argument(
        help="FHIR R4 Bundle JSON file(s), or a Bulk Data $export: a directory (or files) "
             "of NDJSON per resource type")],
    out_dir: Annotated[Path, typer.Option("--out", help="MEDS directory to write")],
    mapping: Annotated[Path | None, typer.Option(help="code mapping YAML (default: "
                                                     "features/fhir_mapping.yaml)")] = None,
    first_id: Annotated[int, typer.Option(help="subject_id of the first patient")] = 1,
    report: Annotated[bool, typer.Option(
        "--report", help="print the mapping report as JSON: mapped and unmapped codes with "
                         "counts, coverage per resource type, and the champion's features "
                         "no input feeds (starved)")] = False,
    task: Annotated[str | None, typer.Option(help="task whose champion --report checks for "
                                                  "starved features (default: "
                                                  "TWINCAST_TASK)")] = None,
    overwrite: bool = False,
) -> None:
    """Convert FHIR to MEDS; patients get subject ids in order of appearance."""
    from features.fhir import FhirMapping

    with _errors():
        m = FhirMapping.load(mapping) if mapping else FhirMapping.load()
        bulk = any(p.is_dir() or p.name.endswith((".ndjson", ".ndjson.gz")) for p in inputs)
        if bulk:
            result, n_events, n_patients = _import_bulk(inputs, out_dir, m, first_id,
                                                        overwrite)
        else:
            result, n_events, n_patients = _import_bundles(inputs, out_dir, m, first_id,
                                                           overwrite)
    console.print(f"imported {n_events:,} events of {n_patients:,} patients to {out_dir}")
    for label, counts in (("unmapped", result.unmapped), ("skipped", result.skipped)):
        for k, v in sorted(counts.items()):
            console.print(f"  {label}: {escape(k)} × {v}")
    if report:
        codes = _champion_features(task or _settings().task)
        rep = result.report(codes, m.targets())
        rep["champion"] = "none found" if codes is None else "checked"
        out.print_json(json.dumps(rep))


def _import_bundles(paths: list[Path], out_dir: Path, m, first_id: int, overwrite: bool):
    import pandas as pd

    from features.events import events_from_frame, write_meds
    from features.fhir import FhirImport, bundle_to_events, import_to_frame, load_bundle

    frames, ids, total = [], {}, FhirImport()
    for path in paths:
        try:
            result = bundle_to_events(load_bundle(path), m)
        except FeaturesError as exc:
            raise type(exc)(f"{path}: {exc}") from None
        for key in result.patients:
            ids.setdefault(key, first_id + len(ids))
        frames.append(import_to_frame(result, ids))
        total.merge(result)
        total.events += result.events
        total.patients.update(result.patients)
    events = events_from_frame(pd.concat(frames, ignore_index=True), source="bundles")
    codes = pd.DataFrame({"code": sorted(set(events["code"].astype(str)))})
    codes["unit"] = codes["code"].map(m.units())
    write_meds(events, out_dir, codes=codes, overwrite=overwrite)
    pd.DataFrame({"identifier": list(ids), "subject_id": list(ids.values())}).to_parquet(
        out_dir / "metadata" / "fhir_identifiers.parquet", index=False)
    return total, len(events), len(ids)


def _import_bulk(paths: list[Path], out_dir: Path, m, first_id: int, overwrite: bool):
    from features.fhir_bulk import export_files, ndjson_to_meds

    files = export_files(paths)
    with _progress("reading the export", None) as bar:
        task = bar.add_task("reading the export", total=sum(f.stat().st_size for f in files))
        result = ndjson_to_meds(files, out_dir, mapping=m, first_id=first_id,
                                overwrite=overwrite,
                                progress=lambda n: bar.advance(task, n))
    rep = result.report
    rep.kept_counts = result.kept
    rep.fed_codes = result.codes
    return rep, result.events, len(result.subject_of)


def _champion_features(task_name: str | None) -> dict[str, list[str]] | None:
    """The champion's feature columns per code (None: no champion, or no registry)."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from features.spec import FeatureSpec
    from serving.model_source import only_task
    from training.errors import RegistryUnreachable
    from training.registry import CHAMPION, model_name

    _quiet_mlflow()
    try:
        tracker = _tracker(_settings())
        task_name = task_name or only_task(tracker)
        if task_name is None:
            return None
        mv = tracker.registry.version_by_alias(model_name(task_name), CHAMPION)
        if mv is None:
            return None
        # the spec is logged on the training run, the parent of the candidate's run
        run = tracker.client.get_run(mv.run_id)
        runs = [mv.run_id, run.data.tags.get("mlflow.parentRunId")]
        spec = None
        with tempfile.TemporaryDirectory() as tmp:
            for run_id in filter(None, runs):
                try:
                    path = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path="feature_spec.json", dst_path=tmp,
                        tracking_uri=tracker.tracking_uri)
                except MlflowException:
                    continue
                spec = FeatureSpec.model_validate_json(Path(path).read_text())
                break
    except (RegistryUnreachable, MlflowException, OSError):
        return None
    if spec is None:
        return None
    return spec.features_by_code()


@app.command("features")
def features_cmd(
    events: Annotated[Path, typer.Option(help="MEDS directory or parquet file")],
    task: Annotated[Path, typer.Option(help="task YAML")],
    out_file: Annotated[Path, typer.Option("--out", help="training set (parquet) to write")],
    scheduler: SchedulerOption = None,
) -> None:
    """Build the point-in-time training set of a task: labels, features and split."""
    with _errors():
        summary = build_training_set(events, task, out_file, _scheduler(scheduler))
        _print_summary(summary)
    _exit_now()


def _exit_now() -> None:
    """End a command whose every file is written and closed without tearing down the
    interpreter's heap (a third of a second after a large training set) — only as the
    ``twincast`` program itself, never when called in process."""
    if Path(sys.argv[0]).name != "twincast":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _scheduler(option: str | None):
    """The Dask scheduler named by ``--scheduler`` or ``TWINCAST_DASK_SCHEDULER``."""
    from features.cluster import SchedulerError, from_environment

    try:
        return from_environment(option)
    except SchedulerError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scheduler") from None


def build_training_set(events: Path, task_path: Path, out_file: Path, scheduler=None):
    from features.events import open_meds
    from features.task import load_task

    task = load_task(task_path)
    dataset = open_meds(events)
    import pyarrow.parquet as pq

    total = sum(pq.ParquetFile(f).metadata.num_rows for f in dataset.files)
    if scheduler is not None:
        from features.cluster import connect
        from features.sharded import write_training_set_on

        with connect(scheduler) as client, _progress("features", total) as bar:
            job = bar.add_task(f"building {task.name} features on {scheduler.describe()} "
                               f"({len(dataset.files)} shards)", total=2 * total)
            summary = write_training_set_on(client, dataset, task, out_file,
                                            progress=lambda n: bar.advance(job, n))
    else:
        from features.pipeline import write_training_set
        from features.sharded import as_directory

        if as_directory(out_file):
            raise typer.BadParameter("a folder of parts is what a cluster run writes "
                                     "(--scheduler); name a .parquet file here",
                                     param_hint="--out")
        with _progress("features", total) as bar:
            job = bar.add_task(f"building {task.name} features", total=total)
            summary = write_training_set(dataset, task, out_file,
                                         progress=lambda n: bar.advance(job, n))
    console.print(f"wrote {summary.rows:,} rows × {len(summary.spec.feature_names)} features "
                  f"to {out_file}")
    return summary


def _print_summary(summary) -> None:
    table = Table(title="training set")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("subjects", f"{summary.subjects:,}")
    table.add_row("events", f"{summary.events:,}")
    table.add_row("prediction rows", f"{summary.rows:,}")
    for split, n in sorted(summary.rows_by_split.items()):
        table.add_row(f"  {split}", f"{n:,}")
    table.add_row("features", f"{len(summary.spec.feature_names):,}")
    for h in summary.positives:
        table.add_row(f"{h}-day: positive / censored",
                      f"{summary.positives[h]:,} / {summary.censored[h]:,}")
    out.print(table)


@app.command()
def task(path: Annotated[Path, typer.Argument(help="task YAML to validate")]) -> None:
    """Validate a task file and print it as twincast reads it."""
    from features.task import load_task

    with _errors():
        t = load_task(path)
        out.print_json(json.dumps(t.model_dump(mode="json")))


def _tracker(settings: Settings):
    from training.tracking import Tracker

    settings.home.mkdir(parents=True, exist_ok=True)
    uri = settings.tracking_uri()
    root = settings.artifact_root() if uri.startswith("sqlite:") else None
    return Tracker(uri, root)


def _quiet_mlflow() -> None:
    import logging
    import warnings

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    warnings.filterwarnings("ignore", category=FutureWarning, module="mlflow")


@app.command()
def train(
    events: Annotated[Path, typer.Option(help="MEDS directory or parquet file")],
    task: Annotated[Path, typer.Option(help="task YAML")],
    trials: Annotated[int, typer.Option(min=1, help="hyperparameter trials per family")] = 8,
    bootstrap: Annotated[int, typer.Option(min=10, help="subject-bootstrap resamples")] = 200,
    seed: int = 0,
    families: Annotated[str, typer.Option(
        help="comma-separated: lightgbm (one model per horizon), hazard (a discrete-time "
             "competing-risks model), logistic")] = "lightgbm,hazard,logistic",
    promote: Annotated[bool, typer.Option(help="let the gate move 'champion'")] = True,
    search_seconds: Annotated[float | None, typer.Option(
        min=1, help="stop each family's search after this long (the run says so); the "
                    "trial count alone decides the result otherwise")] = None,
    scheduler: SchedulerOption = None,
    rounds: Annotated[int, typer.Option(
        min=10, help="on a cluster: LightGBM's rounds, then cut where early stopping on "
                     "the whole early-stopping part would have")] = CLUSTER_ROUNDS,
    work_dir: Annotated[Path | None, typer.Option(
        help="on a cluster: where the training set is written (a folder every worker "
             "sees; default: a temporary folder)")] = None,
) -> None:
    """Train and compare candidates, track them in MLflow, register the best, run the gate."""
    from features.task import load_task
    from training.errors import TrainingError
    from training.train import TrainOptions, candidate_summary
    from training.train import train as run_training

    _quiet_mlflow()
    settings = _settings()
    try:
        with _errors():
            t = load_task(task)
            options = TrainOptions(trials=trials, n_bootstrap=bootstrap, seed=seed,
                                   families=[f.strip() for f in families.split(",")],
                                   promote=promote, search_seconds=search_seconds,
                                   cluster_rounds=rounds,
                                   work_dir=work_dir)
            from features.cluster import connect

            where = _scheduler(scheduler)
            if where is not None:
                console.print(f"training on the Dask cluster {where.describe()}")
            with connect(where) as client:
                result = run_training(events, t, _tracker(settings), options,
                                      log=lambda m: console.print(escape(m)), client=client)
    except TrainingError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    table = Table(title=f"held-out metrics, 95% subject-bootstrap intervals ({t.name})")
    for col in ("candidate", "horizon", "AUROC", "AUPRC", "Brier", "slope", "ECE", "Uno's C"):
        table.add_column(col)
    for row in candidate_summary(result):
        cells = [_fmt_ci(row[k]) for k in ("auroc", "auprc", "brier", "calibration_slope",
                                             "ece", "uno_c")]
        best = " (best)" if row["family"] == result.best else ""
        table.add_row(row["family"] + best, f"{row['horizon']} d", *cells)
    out.print(table)
    out.print(f"MLflow run {result.parent_run_id} (experiment {result.experiment_id}); "
              f"registered version {result.version}: "
              f"{'champion' if result.promoted else 'challenger'} — {result.reason}",
              soft_wrap=True)


@app.command()
def score(
    events: Annotated[Path, typer.Option(help="MEDS directory or parquet file")],
    out_file: Annotated[Path, typer.Option("--out", help="forecasts (parquet) to write")],
    task: Annotated[str | None, typer.Option(
        help="the task whose model scores (default: TWINCAST_TASK, or the only one)")] = None,
    version: Annotated[str | None, typer.Option(
        help="the registered model version (default: the champion)")] = None,
    at: Annotated[str, typer.Option(
        help="prediction-times (every subject's prediction times, as the task defines "
             "them) or last-event (every subject at its last timed event)")
    ] = "prediction-times",
    scheduler: SchedulerOption = None,
) -> None:
    """Forecast a whole MEDS cohort with a registered model version, as parquet."""
    import pyarrow.parquet as pq

    from features.cluster import connect
    from features.events import open_meds
    from training.registry import BUNDLE_DIGEST_TAG
    from training.scoring import write_scores

    if at not in ("prediction-times", "last-event"):
        raise typer.BadParameter("choose prediction-times or last-event", param_hint="--at")
    _quiet_mlflow()
    where = _scheduler(scheduler)
    settings = _settings()
    source = _source(settings, task)
    with _errors():
        try:
            model = source.load(version)
        except Exception as exc:  # unknown version, no champion, unreachable registry
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        dataset = open_meds(events)
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in dataset.files)
        t0 = time.perf_counter()
        meta = {"twincast.model": model.name, "twincast.version": model.version,
                "twincast.run_id": model.run_id, "twincast.at": at,
                "twincast.bundle_sha256": model.tags.get(BUNDLE_DIGEST_TAG, "")}
        on = f" on {where.describe()}" if where else ""
        with connect(where) as client, _progress("scoring", total) as bar:
            job = bar.add_task(f"scoring with {model.name} v{model.version}{on}", total=total)
            summary = write_scores(dataset, model.bundle, out_file, at=at, client=client,
                                   metadata=meta, progress=lambda n: bar.advance(job, n))
        secs = time.perf_counter() - t0
    console.print(f"wrote {summary.rows:,} forecasts of {summary.subjects:,} subjects "
                  f"({model.name} version {model.version}) to {out_file} in {secs:.1f}s "
                  f"({summary.events / max(secs, 1e-9):,.0f} events/s){on}", soft_wrap=True)
    _exit_now()


def _fmt_ci(ci: dict) -> str:
    return f"{ci['estimate']:.3f} ({ci['lower']:.3f}–{ci['upper']:.3f})"


@app.command()
def promote(
    task: Annotated[str, typer.Option(help="task name")],
    version: Annotated[str, typer.Option(help="model version to make champion")],
    reason: Annotated[str, typer.Option(help="why (kept in the promotion log)")],
    by: Annotated[str | None, typer.Option(help="who (default: this user)")] = None,
) -> None:
    """Audited manual override: point 'champion' at a version and log who and why."""
    from training.errors import RegistryError
    from training.registry import current_user, model_name

    _quiet_mlflow()
    tracker = _tracker(_settings())
    try:
        entry = tracker.registry.promote(model_name(task), version, actor=by or current_user(),
                                         kind="manual", reason=reason, task_name=task)
    except RegistryError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"champion of {model_name(task)}: version {entry.from_version} → "
              f"{entry.to_version} (by {entry.actor}: {entry.reason})", soft_wrap=True)


@app.command()
def runs(task: Annotated[str, typer.Option(help="task name")],
         limit: int = 20) -> None:
    """List training runs of a task with their key held-out metrics."""
    from training.registry import CHAMPION, model_name

    _quiet_mlflow()
    tracker = _tracker(_settings())
    name = model_name(task)
    exp = tracker.client.get_experiment_by_name(name)
    if exp is None:
        console.print(f"no runs for task {task!r} yet")
        raise typer.Exit(1)
    champion = tracker.registry.version_by_alias(name, CHAMPION)
    found = tracker.client.search_runs([exp.experiment_id], "tags.`twincast.kind` = 'candidate'",
                                       order_by=["attributes.start_time DESC"], max_results=limit)
    table = Table(title=f"runs of {name}")
    for col in ("run", "started", "family", "data digest", "champion", "metrics (rows)"):
        table.add_column(col, overflow="fold")
    for r in found:
        m = r.data.metrics
        keys = sorted(k for k in m if k.startswith(("auroc_", "brier_", "ece_", "calibration_"))
                      and not k.endswith(("_lo", "_hi", "_pw")))
        cells = ", ".join(f"{k} {m[k]:.3f} ({m.get(k + '_lo', float('nan')):.3f}–"
                          f"{m.get(k + '_hi', float('nan')):.3f})" for k in keys)
        started = dt.datetime.fromtimestamp(r.info.start_time / 1000, dt.UTC)
        is_champ = "yes" if champion and champion.run_id == r.info.run_id else ""
        table.add_row(r.info.run_id[:12], started.strftime("%Y-%m-%d %H:%M"),
                      r.data.tags.get("family", ""), r.data.tags.get("data_digest", "")[:12],
                      is_champ, cells)
    out.print(table)


@app.command()
def ui(port: int = 5000, host: str = "127.0.0.1") -> None:
    """Open the MLflow UI on twincast's tracking store."""
    import subprocess

    settings = _settings()
    uri = settings.tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
           "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", settings.artifact_root()]
    console.print(f"MLflow UI on http://{host}:{port} (store {uri})")
    raise typer.Exit(subprocess.call(cmd))


keys_app = typer.Typer(help="API keys of the twin service.", no_args_is_help=True)
db_app = typer.Typer(help="The twin store's database.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
users_app = typer.Typer(help="People who sign in to the care-team pages (/ui).",
                        no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(db_app, name="db")


def _store(migrate: bool = True):
    from serving.store import open_store

    settings = _settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    return open_store(settings.database(), migrate=migrate)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the store's Alembic migrations (the service also does this at start)."""
    from serving.store.db import current_revision

    store = _store()
    out.print(f"{_settings().database().split('@')[-1]} at revision "
              f"{current_revision(store.engine)}")


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="clinical, auditor or admin")],
    name: Annotated[str, typer.Option(help="who holds the key (shown in the access log)")],
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from serving.errors import Conflict

    try:
        token = _store().keys.create(name, role)
    except (ValueError, Conflict) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"API key for {name} ({role}); it will not be shown again:")
    out.print(token)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (names, roles, prefixes; never the secrets)."""
    table = Table(title="API keys")
    for col in ("name", "role", "prefix", "created", "revoked"):
        table.add_column(col)
    for k in _store().keys.list():
        table.add_row(k.name, k.role, k.prefix + "…", f"{k.created_at:%Y-%m-%d %H:%M}",
                      f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Option(help="the key's name")]) -> None:
    """Revoke a key: it stops working at once."""
    from serving.errors import NotFound

    try:
        _store().keys.revoke(name)
    except NotFound as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"revoked {name}: every worker refuses it from now on")


def _password(from_stdin: bool) -> str:
    """A new password: from standard input (one line) or asked for twice, hidden."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Option(help="the person's user name (in the access log)")],
    role: Annotated[str, typer.Option(help="clinical, auditor or admin")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="read the password from standard input")] = False,
) -> None:
    """Create a person's account for the pages; the password is stored as an argon2
    hash (at least 12 characters)."""
    from serving.errors import Conflict

    try:
        _store().users.create(name, role, _password(password_stdin))
    except (ValueError, Conflict) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"created {name} ({role}): they sign in at /ui/login")


@users_app.command("list")
def users_list() -> None:
    """List accounts (names, roles, whether disabled; never a password)."""
    table = Table(title="users")
    for col in ("name", "role", "created", "disabled"):
        table.add_column(col)
    for u in _store().users.list():
        table.add_row(u.name, u.role, f"{u.created_at:%Y-%m-%d %H:%M}",
                      f"{u.disabled_at:%Y-%m-%d %H:%M}" if u.disabled_at else "")
    out.print(table)


def _set_disabled(name: str, disabled: bool) -> None:
    from serving.errors import NotFound

    try:
        _store().users.set_disabled(name, disabled)
    except NotFound as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Option(help="the user name")]) -> None:
    """Disable an account: its sessions stop working at once, in every worker."""
    _set_disabled(name, True)
    out.print(f"disabled {name}")


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Option(help="the user name")]) -> None:
    """Enable a disabled account again (they sign in anew)."""
    _set_disabled(name, False)
    out.print(f"enabled {name}")


@users_app.command("set-password")
def users_set_password(
    name: Annotated[str, typer.Option(help="the user name")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
) -> None:
    """Set a new password; the person's open sessions end."""
    from serving.errors import NotFound

    try:
        _store().users.set_password(name, _password(password_stdin))
    except (ValueError, NotFound) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"new password set for {name}; their sessions ended")


def serve_command(task: str | None, host: str, port: int, workers: int | None) -> list[str]:
    """The ``bentoml serve`` command line and environment for the twin service."""
    return [str(Path(sys.executable).parent / "bentoml"), "serve",
            "twincast.service:Twincast", "--host", host, "--port", str(port)]


@app.command()
def serve(
    task: Annotated[str | None, typer.Option(help="task name (default: TWINCAST_TASK, "
                                                  "or the only registered model)")] = None,
    host: str = "127.0.0.1",
    port: int = 3000,
    workers: Annotated[int | None, typer.Option(min=1, help="worker processes")] = None,
) -> None:
    """Run the BentoML twin service (migrates the store first)."""
    import os

    settings = _settings()
    _store()  # migrate once here, before the workers start
    if not (task or settings.task):
        from serving.model_source import only_task

        _quiet_mlflow()
        task = only_task(_tracker(settings))
        if task is None:
            console.print("[bold red]error:[/] which task? pass --task (or set TWINCAST_TASK); "
                          "the registry does not hold exactly one twincast model", soft_wrap=True)
            raise typer.Exit(2)
    env = {**os.environ, "BENTOML_HOME": str((settings.home / "bentoml").resolve()),
           "TWINCAST_HOME": str(settings.home.resolve())}
    if task:
        env["TWINCAST_TASK"] = task
    if workers:
        env["TWINCAST_WORKERS"] = str(workers)
    cmd = serve_command(task, host, port, workers)
    console.print(f"twincast service on http://{host}:{port}  (docs: /v1/docs)")
    root = Path(__file__).resolve().parents[1]
    os.chdir(root)
    os.execve(cmd[0], cmd, env)


twins_app = typer.Typer(help="Twins in the store.", no_args_is_help=True)
app.add_typer(twins_app, name="twins")


@twins_app.command("import")
def twins_import(
    events: Annotated[Path, typer.Option(help="MEDS directory or parquet file")],
    subjects: Annotated[int | None, typer.Option(help="only the first N subjects")] = None,
) -> None:
    """Load MEDS histories into twins (new or existing; the service forecasts them)."""
    from features.events import read_events
    from serving.errors import BadInput
    from serving.imports import import_events

    with _errors():
        ev = read_events(events)
        if subjects:
            keep = ev["subject_id"].drop_duplicates().head(subjects)
            ev = ev[ev["subject_id"].isin(keep)]
        try:
            twins, n = import_events(_store(), ev)
        except BadInput as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
    out.print(f"{twins:,} twins, {n:,} new events; the service forecasts them when it runs")


@twins_app.command("replay")
def twins_replay(
    events: Annotated[Path, typer.Option(help="MEDS directory or parquet file")],
    task: Annotated[str | None, typer.Option(help="task name (its champion forecasts)")] = None,
    step_days: Annotated[float, typer.Option(min=0.01, help="events arrive in steps of "
                                             "this many days")] = 7.0,
    delay_hours: Annotated[float, typer.Option(min=0, help="reporting delay after each "
                                               "step")] = 24.0,
    into_existing: Annotated[bool, typer.Option(help=(
        "play into a store that already holds twins (its rows would carry simulated "
        "times beside real ones: for test stores only)"))] = False,
) -> None:
    """Play a cohort through the write path in time order under a simulated clock: each
    step's events arrive together and every twin is forecast at once, as a deployed
    service would have — so monitoring has forecasts made before their outcomes."""
    from features.events import read_events
    from serving.bootstrap import build_service
    from serving.playback import play, steps_of

    _quiet_mlflow()
    settings = _settings()
    if task:
        settings = settings.model_copy(update={"task": task})
    with _errors():
        ev = read_events(events)
        service = build_service(settings.serving(), start=False)
        with service.store.read() as s:
            occupied = service.store.twins.any_twin(s)
        if occupied and not into_existing:
            console.print("[bold red]error:[/] the twin store is not empty: a replay writes "
                          "simulated arrival and forecast times; use an empty store "
                          "(TWINCAST_DATABASE_URL) or pass --into-existing")
            raise typer.Exit(2)
        service.models.follow_champion("replay")
        with _progress("replaying", steps_of(ev, step_days)) as bar:
            job = bar.add_task("replaying", total=steps_of(ev, step_days))
            result = play(service.store, service.models, ev, step_days=step_days,
                          delay_hours=delay_hours,
                          progress=lambda n: bar.update(job, completed=n))
        service.store.dispose()
    out.print(f"replayed {result.events:,} events of {result.twins:,} twins in "
              f"{result.steps:,} steps ({result.writes:,} writes), simulated "
              f"{result.first:%Y-%m-%d} to {result.last:%Y-%m-%d}")


@app.command("refresh")
def refresh_cmd(
    task: Annotated[str | None, typer.Option(help="task name (its champion forecasts)")] = None,
    scheduler: SchedulerOption = None,
    chunk: Annotated[int, typer.Option(min=16, max=20_000, help=(
        "stale twins per task (each task writes them in transactions of "
        "TWINCAST_REFRESH_CHUNK twins)"))] = 1024,
) -> None:
    """Re-forecast every twin not on the champion version, under the lease the service's
    own refresh takes (refused while the service or another runner holds it), on a Dask
    cluster with --scheduler, else in this process.  Resumable: a run after a failure
    re-forecasts only the twins still stale.  Exit status 0 when every twin is on the
    champion, 3 when another runner holds the refresh, 1 when the refresh failed or lost
    its lease, 2 for bad input."""
    from features.cluster import SchedulerError, connect
    from serving.cluster_refresh import (
        LeaseLost,
        RefreshBusy,
        RefreshFailed,
        Target,
        adopt_champion,
        holder,
        refresh_twins,
    )
    from serving.errors import NotReady
    from serving.store import open_store
    from serving.store.db import worker_name

    _quiet_mlflow()
    where = _scheduler(scheduler)
    settings = _settings()
    config = settings.serving()
    source = _source(settings, task)
    worker = f"{'dask' if where else 'refresh'}:{worker_name()}"
    store = open_store(config.database_url)
    try:
        model = adopt_champion(store, source, worker)
        busy = holder(store, model.name, model.version)  # before starting a cluster
    except NotReady as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        store.dispose()
    if busy is not None:
        console.print(f"[bold red]refused:[/] {escape(busy)}: not running beside it",
                      soft_wrap=True)
        raise typer.Exit(3)
    target = Target(config.database_url, config.tracking_uri, config.artifact_root,
                    source.task_name, model.version, chunk=config.refresh_chunk,
                    failpoints=config.failpoints)
    t0 = time.monotonic()
    try:
        with connect(where) as client, _progress("refreshing", None) as bar:
            job = bar.add_task(f"refreshing twins to {model.name} version {model.version} "
                               f"on {where.describe() if where else 'this process'}",
                               total=None)
            result = refresh_twins(
                target, client, worker=worker, model=model, per_task=chunk,
                lease_seconds=config.refresh_lease_seconds,
                progress=lambda n, total: bar.update(job, completed=n, total=total))
    except SchedulerError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except RefreshBusy as exc:
        console.print(f"[bold red]refused:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(3) from None
    except (LeaseLost, RefreshFailed) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if result.job is None:
        out.print(f"every twin is on {model.name} version {model.version}: nothing to "
                  "refresh")
        return
    out.print(f"refreshed {result.refreshed:,} twins to {model.name} version "
              f"{model.version} in {result.seconds:.1f} s ({result.per_second:,.0f} twins/s; "
              f"{time.monotonic() - t0:.1f} s with the cluster's start) on "
              f"{where.describe() if where else 'this process'}: job {result.job}, "
              f"{result.passes} pass{'es' if result.passes > 1 else ''}, verified")


def _days(text: str) -> int:
    t = text.strip().lower()
    try:
        value = int(t[:-1]) if t.endswith("d") else int(t)
    except ValueError:
        raise typer.BadParameter(f"a window is a number of days such as 90d, got {text!r}",
                                 param_hint="--window") from None
    if value < 7:
        raise typer.BadParameter("a window is at least 7 days", param_hint="--window")
    return value


@app.command("what-if")
def what_if_cmd(
    subject: Annotated[int, typer.Option(help="the subject_id in the MEDS data")],
    events: Annotated[Path, typer.Option(help=(
        "the scenario as JSON, as POST /v1/twins/{id}/what-if takes it: "
        '{"events": [{"code": "RX//SGLT2"}, {"code": "VITAL//SBP", "numeric_value": 125}], '
        '"as_of": "2024-01-01T00:00:00Z"} (as_of optional: the latest event)'))],
    meds: Annotated[Path, typer.Option(help="the MEDS directory holding the subject")],
    task: Annotated[str | None, typer.Option(help="task name (default: the only one)")] = None,
    version: Annotated[str | None, typer.Option(help="model version (default: champion)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
) -> None:
    """Risks and trajectories under hypothetical events beside the subject's own, at one
    as-of time, offline from a MEDS directory — as the service answers it (nothing is
    stored).  Associational: a difference is not the effect of a treatment."""
    import numpy as np
    import pandas as pd
    from pydantic import ValidationError

    from features.events import open_meds
    from serving.api.schemas import WhatIfIn, naive_utc
    from serving.errors import ServingError
    from serving.whatif import ScenarioEvent, check_scenario, what_if

    _quiet_mlflow()
    try:
        body = WhatIfIn.model_validate_json(events.read_bytes())
    except FileNotFoundError:
        console.print(f"[bold red]error:[/] {events}: no such file")
        raise typer.Exit(2) from None
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        console.print(f"[bold red]error:[/] {events}: {escape(where)}", soft_wrap=True)
        raise typer.Exit(2) from None
    settings = _settings()
    source = _source(settings, task)
    with _errors():  # the subject's rows only, file by file
        parts = [f[f["subject_id"] == subject] for f in open_meds(meds).iter_files()]
    mine = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if mine.empty:
        console.print(f"[bold red]error:[/] subject {subject} is not in {meds}")
        raise typer.Exit(2)
    rows = list(zip(mine["subject_id"].tolist(), mine["time"].to_numpy(),
                    mine["code"].astype(str).tolist(),
                    mine["numeric_value"].to_numpy(np.float64).tolist(), strict=True))
    try:
        version = version or source.champion_version()
        model = source.load(version) if version is not None else None
    except Exception as exc:  # unreachable registry, unknown version, refused artifact
        console.print(f"[bold red]error:[/] the model could not be loaded: "
                      f"{escape(str(exc) or type(exc).__name__)}", soft_wrap=True)
        raise typer.Exit(2) from None
    if model is None:
        console.print("[bold red]error:[/] no champion: pass --version")
        raise typer.Exit(2)
    scenario = [ScenarioEvent(e.code, e.numeric_value) for e in body.events]
    try:  # offline, the user holds the data: no role limits treatment scenarios
        check_scenario(model, scenario, "admin")
        answer = what_if(model, subject, rows, scenario, naive_utc(body.as_of))
    except ServingError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if json_out:
        out.print_json(json.dumps(answer))
        return
    out.print(what_if_table(answer))
    out.print(f"[bold]{answer['interpretation']}:[/] {answer['interpretation_text']}")


def what_if_table(answer: dict) -> Table:
    """A what-if answer as a terminal table (risks, then trajectory medians)."""
    table = Table(title=f"what-if for subject {answer['subject_id']} as of {answer['as_of']} "
                        f"({answer['model']['name']} v{answer['model']['version']})")
    for col in ("", "baseline", "scenario", "difference"):
        table.add_column(col)
    base, scen, diff = answer["baseline"], answer["scenario"], answer["difference"]
    if diff is None:
        table.add_row("status", f"{base['status']} {base['reason'] or ''}",
                      f"{scen['status']} {scen['reason'] or ''}", "")
        return table
    for h in base["risks"]:
        table.add_row(f"risk {h}", f"{base['risks'][h]:.3f}", f"{scen['risks'][h]:.3f}",
                      f"{diff['risks'][h]:+.3f}")
    for b, s_, d in zip(base["trajectories"] or [], scen["trajectories"] or [],
                        diff["trajectories"], strict=True):
        span = "; ".join(f"{round(i['level'] * 100)}% {i['lower']:g}–{i['upper']:g}"
                         for i in b["intervals"])
        span_s = "; ".join(f"{round(i['level'] * 100)}% {i['lower']:g}–{i['upper']:g}"
                           for i in s_["intervals"])
        table.add_row(f"{b['code']} in {b['horizon_days']} d ({b['unit'] or ''})",
                      f"{b['median']:g} ({span})", f"{s_['median']:g} ({span_s})",
                      f"{d['median']:+g}")
    return table


@app.command()
def monitor(
    task: Annotated[str, typer.Option(help="task name")],
    since: Annotated[dt.datetime | None, typer.Option(
        formats=["%Y-%m-%d"], help="first as-of day of the forecasts to judge")] = None,
    until: Annotated[dt.datetime | None, typer.Option(
        formats=["%Y-%m-%d"], help="the day after the last one")] = None,
    window: Annotated[str | None, typer.Option(
        help="window of as-of times, e.g. 90d (default: the task's)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    log: Annotated[bool, typer.Option("--log/--no-log", help=(
        "store the alerts and log the run to MLflow"))] = True,
    thresholds: Annotated[Path | None, typer.Option(help=(
        "a task YAML whose monitoring: section is used instead of the one the champion "
        "was trained with (thresholds change without retraining)"))] = None,
) -> None:
    """Does the served model still keep its promise?  Realised metrics on matured
    forecasts beside the held-out ones, metrics expected if calibration holds on the
    rest, drift against the training reference, and alerts (exit 1 when one fires)."""
    import tempfile

    from serving.monitoring import VersionData
    from serving.monitoring import monitor as run_monitor
    from training.monitoring import log_run
    from training.registry import model_name

    _quiet_mlflow()
    settings = _settings()
    source = _source(settings, task)
    name = model_name(task)
    cache: dict[str, VersionData | None] = {}

    def version_data(version: str) -> VersionData | None:
        if version not in cache:
            try:
                m = source.load(version)
                cache[version] = VersionData(m.bundle, m.metrics)
            except Exception as exc:  # unreachable, deleted or refused: said, then judged without
                console.print(f"[yellow]version {version}: not loaded ({type(exc).__name__})"
                              "; judged without its held-out values or reference[/]")
                cache[version] = None
        return cache[version]

    with _errors():
        champion = source.champion_version()
        if champion is None:
            console.print(f"[bold red]error:[/] {name} has no champion: nothing is served")
            raise typer.Exit(2)
        served = version_data(champion)
        if served is None:
            console.print(f"[bold red]error:[/] the champion ({name} version {champion}) "
                          "could not be loaded: its task says what to monitor")
            raise typer.Exit(2)
        if since is not None and until is not None and until <= since:
            raise typer.BadParameter("--until must be after --since", param_hint="--until")
        task_obj = served.bundle.task
        if thresholds is not None:
            from features.task import load_task

            task_obj = task_obj.model_copy(update={"monitoring": load_task(thresholds)
                                                   .monitoring})
        store = _store()
        report = run_monitor(store, task_obj, name, version_data, since=since, until=until,
                             window_days=_days(window) if window else None,
                             progress=lambda m: console.print(escape(m)))
        if log:
            with tempfile.TemporaryDirectory() as tmp:
                report["mlflow_run_id"] = log_run(_tracker(settings), name, report, tmp)
            store.alerts.add(name, report["mlflow_run_id"], report["alerts"])
        store.dispose()
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1, default=str))
    _print_monitoring(report)
    if report["alerts"]:
        raise typer.Exit(1)


def _print_monitoring(report: dict) -> None:
    fc = report.get("forecasts", {})
    out.print(f"{report['model']}: {fc.get('counted', 0):,} of {fc.get('stored', 0):,} stored "
              f"forecasts count (first per version, subject and as-of time; made as "
              f"foresight); data as of {report.get('now')}; labels {report['labels']}")
    for v, vr in report["versions"].items():
        table = Table(title=f"version {v}: realised on matured forecasts (every forecast "
                            f"weighing the same, as held-out rows; 95% subject-bootstrap) · "
                            f"expected = {report['estimate_label']}")
        for col in ("window", "horizon", "patients", "matured", "events", "AUROC",
                    "held-out", "expected AUROC", "CITL", "slope", "ECE", "max PSI"):
            table.add_column(col)
        for w in vr["windows"]:
            psis = [d["psi"] for d in w.get("drift", {}).get("features", {}).values()
                    if d.get("psi") is not None]
            for h, hw in w["horizons"].items():
                r = hw.get("realised")
                e = hw.get("expected")
                held = (vr["heldout"].get(h) or {}).get("auroc")

                def cell(part, m):
                    if not isinstance(part, dict) or part.get(m) is None \
                            or part[m].get("estimate") is None:
                        return "—"
                    return _fmt_ci(part[m]) if part[m].get("lower") is not None else \
                        f"{part[m]['estimate']:.3f}"
                table.add_row(w["start"][:10], f"{h} d", str(hw.get("patients", "<10")),
                              str(hw.get("matured_patients", "—")), str(hw.get("events") or "—"),
                              cell(r, "auroc"),
                              f"{held['estimate']:.3f}" if held else "—", cell(e, "auroc"),
                              cell(r, "citl"), cell(r, "calibration_slope"), cell(r, "ece"),
                              f"{max(psis):.3f}" if psis else "—")
        out.print(table)
    if report["alerts"]:
        out.print(f"[bold red]{len(report['alerts'])} alert(s)[/] ({report['tests']} tests, "
                  f"family-wise false-alarm rate {report.get('alpha')}):")
        for a in report["alerts"]:
            what = (f"{a['name']} at {a['horizon_days']} d" if a["kind"] == "metric"
                    else f"drift of {a['name']}")
            out.print(f"  version {a['model_version']}, {a['window_start'][:10]} to "
                      f"{a['window_end'][:10]}: {what}: {a['value']:.3f} against "
                      f"{a['reference']:.3f}")
    else:
        out.print(f"no alerts ({report['tests']} tests)")


def _demo_twin(ev) -> tuple[int, object, float]:
    """An alive, ESKD-free twin with a low eGFR: its forecast moves visibly."""
    import numpy as np

    followed = set(ev.loc[ev["code"] == "ADMIN//END_OF_FOLLOWUP", "subject_id"])
    egfr = ev[(ev["code"] == "LAB//EGFR") & ev["subject_id"].isin(list(followed))]
    last = egfr.groupby("subject_id").last()
    pick = last[(last["numeric_value"] > 20) & (last["numeric_value"] < 35)]
    sid = int(pick.index[0]) if len(pick) else int(last.index[0])
    t = ev.loc[ev["subject_id"] == sid, "time"].max() + np.timedelta64(30, "D")
    return sid, t, float(last.loc[sid, "numeric_value"])


audit_app = typer.Typer(help="Trace forecasts, promotions, runs and access.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _source(settings: Settings, task: str | None = None):
    from serving.model_source import ModelSource, only_task

    tracker = _tracker(settings)
    name = task or settings.task or only_task(tracker)
    if name is None:
        console.print("[bold red]error:[/] which task? pass --task or set TWINCAST_TASK")
        raise typer.Exit(2)
    return ModelSource(tracker, name)


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[bold red]✗[/]"


@audit_app.command("forecast")
def audit_forecast_cmd(
    forecast_id: Annotated[str, typer.Argument(help="the forecast's id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the chain as JSON")] = False,
) -> None:
    """The whole chain behind one served forecast, each link verified (exit 1 if broken)."""
    from serving.audit import audit_forecast

    go_offline(service=True)  # a registry that is down is said so in seconds
    _quiet_mlflow()
    settings = _settings()
    store = _store()
    with store.read() as s:
        row = store.twins.forecast_by_id(s, forecast_id)
        if row is None:
            console.print(f"[bold red]error:[/] no forecast {escape(forecast_id)}")
            raise typer.Exit(2)
        task = row.model_name.removeprefix("twincast-")
    result = audit_forecast(store, _source(settings, task), forecast_id)
    if as_json:
        out.print_json(json.dumps(result, default=str))
    else:
        c = result["chain"]
        f = c["forecast"]
        out.print(f"[bold]forecast {f['forecast_id']}[/]: subject {f['subject_id']}, as of "
                  f"{f['as_of']}, {f['status']} {f['risks'] or f['reason']}, asked by "
                  f"{f['requested_by']} at {f['created_at']}", soft_wrap=True)
        if "model" in c:
            m = c["model"]
            state = ("champion" if m["is_champion"]
                     else f"not champion now: champion is {m['current_champion']}")
            out.print(f"model: {m['name']} version {m['version']} ({state})")
        if "run" in c:
            r = c["run"]
            keys = [k for k in r["metrics"] if k.startswith(("auroc_", "ece_", "brier_"))
                    and not k.endswith("_pw")]
            out.print(f"run: {r['run_id']}  " + ", ".join(
                f"{k} {r['metrics'][k]['estimate']:.3f} ({r['metrics'][k]['lower'] or 0:.3f}–"
                f"{r['metrics'][k]['upper'] or 0:.3f})" for k in keys), soft_wrap=True)
        if "data" in c:
            out.print(f"training data: digest {c['data']['digest']}; inputs "
                      f"{[d['source'] for d in c['data']['dataset_inputs']]}", soft_wrap=True)
        if "task_digest" in c:
            out.print(f"task {c['task_digest'][:16]}…, FeatureSpec "
                      f"{c['feature_spec_digest'][:16]}…, code {c['code_version']}")
        for link in result["links"]:
            out.print(f"  {_mark(link['ok'])} {link['name']}: {escape(link['detail'])}",
                      soft_wrap=True)
        out.print("[green]the chain holds[/]" if result["ok"] else "[bold red]broken link(s)[/]")
    raise typer.Exit(0 if result["ok"] else 1)


@audit_app.command("verify")
def audit_verify() -> None:
    """Check every stored forecast against its digest and its twin's chain, and every
    anchor against the database (exit 1 on any break)."""
    from serving.tamper import verify_anchors, verify_chains

    go_offline(service=True)
    _quiet_mlflow()
    store = _store()
    checked, breaks = verify_chains(store)
    for b in breaks:
        what = f"forecast {b.forecast_id}" if b.forecast_id else f"twin {b.subject_id}"
        out.print(f"  {_mark(False)} {what}: {b.reason}", soft_wrap=True)
    out.print(f"checked {checked:,} forecasts: {len(breaks)} break(s)")
    bad = bool(breaks)
    try:
        results = verify_anchors(store, _tracker(_settings()))
    except Exception as exc:  # the tracking store did not answer
        out.print(f"  {_mark(False)} anchors not checked: the tracking store is unreachable "
                  f"({type(exc).__name__})")
        raise typer.Exit(1) from None
    for a in results:
        if not a["ok"]:
            out.print(f"  {_mark(False)} anchor of {a['time'][:19]}: "
                      + "; ".join(a["problems"]), soft_wrap=True)
    out.print(f"checked {len(results)} anchor(s): "
              f"{sum(not a['ok'] for a in results)} broken")
    bad = bad or any(not a["ok"] for a in results)
    raise typer.Exit(1 if bad else 0)


@audit_app.command("anchor")
def audit_anchor(
    settle: Annotated[float, typer.Option(help="anchor rows at least this many seconds "
                                               "old (PostgreSQL commits ids out of order)")]
    = 60.0,
) -> None:
    """Anchor the forecast chains and the access log outside the database, now (the
    service does it every TWINCAST_ANCHOR_SECONDS)."""
    from serving.tamper import ANCHOR_LEASE, anchor
    from training.registry import current_user

    go_offline(service=True)
    _quiet_mlflow()
    store = _store()
    holder = f"cli:{current_user()}"
    if not store.leases.take(ANCHOR_LEASE, holder, 120):
        console.print("[bold red]error:[/] a service worker is writing an anchor right now: "
                      "try again in a minute")
        raise typer.Exit(2)
    try:
        tags = anchor(store, _tracker(_settings()), by=holder, settle_seconds=settle)
    finally:
        store.leases.release(ANCHOR_LEASE, holder)
    out.print(f"anchored {int(tags['twins']):,} twins' forecast chains up to forecast "
              f"{tags['forecast_seq']} (root {tags['forecast_root'][:16]}…) and "
              f"{int(tags['access_rows']):,} access-log rows up to id {tags['access_upto']}")


@audit_app.command("promotions")
def audit_promotions(
    task: Annotated[str, typer.Option(help="task name")],
    at: Annotated[str | None, typer.Option(help="which version was champion at this "
                                                "ISO time (UTC)?")] = None,
) -> None:
    """Every move of the champion alias: from, to, when, by whom or which gate, and why."""
    _quiet_mlflow()
    tracker = _tracker(_settings())
    log = tracker.registry.promotion_log(task)
    table = Table(title=f"champion moves of twincast-{task}")
    for col in ("time (UTC)", "from", "to", "by", "how", "reason"):
        table.add_column(col, overflow="fold")
    for e in log:
        table.add_row(e.time[:19], str(e.from_version or "–"), e.to_version, e.actor, e.kind,
                      e.reason)
    out.print(table)
    if at:
        when = dt.datetime.fromisoformat(at)
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        serving = [e for e in log if dt.datetime.fromisoformat(e.time) <= when]
        out.print(f"champion at {when.isoformat()}: "
                  f"{'version ' + serving[-1].to_version if serving else 'none'}")


@audit_app.command("runs")
def audit_runs(task: Annotated[str, typer.Option(help="task name")], limit: int = 50) -> None:
    """Training runs side by side: date, data digest, champion or not, metrics with CIs."""
    runs(task=task, limit=limit)


@audit_app.command("access")
def audit_access(
    subject: Annotated[int, typer.Option(help="the twin's subject_id")],
    limit: int = 200,
) -> None:
    """Who read or wrote a twin, when, through which key or as which person signed in to
    the pages (names, never secrets)."""
    rows = _store().access.read(subject, limit)
    table = Table(title=f"access to twin {subject}")
    for col in ("time (UTC)", "who", "role", "action", "request", "status"):
        table.add_column(col)
    for r in rows:
        who = (f"person {r.key_name}" if r.user_id is not None
               else f"key {r.key_name}" if r.key_name else "–")
        table.add_row(f"{r.time:%Y-%m-%d %H:%M:%S}", who, r.role or "–",
                      r.action, f"{r.method} {r.path}", str(r.status_code))
    out.print(table)


@app.command()
def report(
    run_id: Annotated[str | None, typer.Argument(
        help="a training job's run id (or a candidate's; with --monitoring: a monitoring "
             "run's, default the latest)")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="HTML file to write")] =
    Path("report.html"),
    log: Annotated[bool, typer.Option(help="also log it to the run")] = True,
    monitoring: Annotated[bool, typer.Option(
        "--monitoring", help="the monitoring report of --task instead")] = False,
    task: Annotated[str | None, typer.Option(help="task name (with --monitoring)")] = None,
) -> None:
    """A self-contained HTML report of a training job, or (--monitoring) of the latest
    monitoring run: metrics over time, calibration then and now, drift, alerts."""
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    tracker = _tracker(_settings())
    try:
        if monitoring:
            path = _monitoring_report(tracker, run_id, task, out_file, log)
        else:
            if run_id is None:
                raise typer.BadParameter("give a training run's id (or --monitoring)",
                                         param_hint="RUN_ID")
            from training.report import write_report

            path = write_report(tracker, run_id, out_file, log=log)
    except MlflowException as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc).splitlines()[0])}")
        raise typer.Exit(2) from None
    out.print(f"wrote {path}")


def _monitoring_report(tracker, run_id: str | None, task: str | None, out_file: Path,
                       log: bool) -> Path:
    import mlflow

    from training.monitoring_report import latest_run, write
    from training.registry import model_name

    if task is None:
        raise typer.BadParameter("which task? --task NAME", param_hint="--task")
    name = model_name(task)
    run_id = run_id or latest_run(tracker, name)
    if run_id is None:
        console.print(f"[bold red]error:[/] no monitoring run of {name} yet: run "
                      f"`twincast monitor --task {task}` first")
        raise typer.Exit(2)

    def heldout_calibration(version: str):
        try:
            mv = tracker.registry.version(name, version)
            with tracker.active():
                ev = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/evaluation.json")
        except Exception:  # a version gone from the registry: no "then"
            return None
        return {h: e.get("calibration_bins") for h, e in ev["horizons"].items()}

    path = write(tracker, run_id, out_file, heldout_calibration)
    if log:
        with tracker.active():
            tracker.client.log_artifact(run_id, str(path))
    return path


@app.command()
def demo(
    subjects: Annotated[int, typer.Option(min=100)] = 5000,
    seed: int = 0,
    trials: Annotated[int, typer.Option(min=1)] = 4,
    bootstrap: Annotated[int, typer.Option(min=10)] = 100,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve",
                                              help="end with the service running")] = True,
    port: int = 3000,
) -> None:
    """The main job on the embedded default: simulate → features → train → champion →
    the twin service running on 127.0.0.1 with a demo key and example requests."""
    settings = _settings()
    home = settings.home
    cohort = home / "demo" / "cohort"
    task_file = Path(__file__).resolve().parents[1] / "examples" / "tasks" / "eskd.yaml"
    with _errors():
        if not cohort.exists():
            simulate(out_dir=cohort, subjects=subjects, seed=seed, shard_subjects=10_000,
                     overwrite=False)
        else:
            console.print(f"using the cohort already in {cohort}")
        summary = build_training_set(cohort, task_file, home / "demo" / "eskd_training.parquet")
        _print_summary(summary)
    train(events=cohort, task=task_file, trials=trials, bootstrap=bootstrap, seed=seed,
          families="lightgbm,hazard,logistic", promote=True)
    from training.registry import CHAMPION, model_name

    tracker = _tracker(settings)
    champ = tracker.registry.version_by_alias(model_name("eskd"), CHAMPION)
    out.print("")
    if champ is not None:
        out.print(f"champion: {model_name('eskd')} version {champ.version} "
                  f"(run {champ.run_id}) — models:/{model_name('eskd')}@champion")
    out.print(f"MLflow store: {settings.tracking_uri()}")
    out.print("look at it: twincast ui   (then open http://127.0.0.1:5000)")
    out.print("list runs:  twincast runs --task eskd")
    if not serve_after:
        return
    import secrets

    import pandas as pd

    from features.events import read_events
    from serving.imports import import_events

    ev = read_events(cohort)
    keep = ev["subject_id"].drop_duplicates().head(500)
    ev = ev[ev["subject_id"].isin(keep)].copy()
    # the simulated study ended in 2024: moved to end 45 days ago, as a deployment would
    # see its patients today (a forecast whose window has ended shows as expired)
    end = pd.Timestamp.now(tz="UTC").tz_localize(None) - pd.Timedelta(days=45)
    ev["time"] = ev["time"] + (end - ev["time"].max()).floor("D")
    store = _store()
    twins, _ = import_events(store, ev, source="demo")
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}"
    key = store.keys.create(f"demo-{stamp}", "clinical")
    person, password = f"demo-user-{stamp}", secrets.token_urlsafe(12)
    store.users.create(person, "clinical", password)
    sid, when, egfr = _demo_twin(ev)
    url = f"http://127.0.0.1:{port}"
    body = ('{"events": [{"time": "' + when.strftime("%Y-%m-%dT%H:%M:%SZ")
            + '", "code": "LAB//EGFR", "numeric_value": ' + f"{max(egfr / 2, 8):.0f}" + "}]}")
    out.print(f"\n{twins:,} twins loaded; a demo key (clinical role) was created.\n"
              "Once the service is up, in another terminal:\n")
    out.print(f"KEY={key}", soft_wrap=True)
    out.print(f"curl -s {url}/v1/twins/{sid} -H \"Authorization: Bearer $KEY\"   "
              "# current forecast", soft_wrap=True)
    out.print(f"curl -s -X POST {url}/v1/twins/{sid}/events -H \"Authorization: Bearer $KEY\""
              f" -H 'content-type: application/json' -d '{body}'   "
              "# a falling eGFR: the risk goes up", soft_wrap=True)
    out.print(f"curl -s {url}/v1/twins/{sid}/forecasts -H \"Authorization: Bearer $KEY\"   "
              "# the forecast history\n", soft_wrap=True)
    out.print(f"The care-team pages: {url}/ui — sign in as {person} with the password "
              f"{password} (shown once; `twincast users create` makes real accounts).\n",
              soft_wrap=True)
    serve(task="eskd", host="127.0.0.1", port=port, workers=None)


if __name__ == "__main__":
    app()
