"""The ``twincast`` command line."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

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
from twincast.settings import Settings, go_offline

app = typer.Typer(help="twincast: digital twins with live, traceable risk forecasts.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
import_app = typer.Typer(help="Convert other formats to MEDS.", no_args_is_help=True)
app.add_typer(import_app, name="import")
console = Console(stderr=True)
out = Console()


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
    shard_subjects: Annotated[int, typer.Option(min=1)] = 10_000,
    overwrite: bool = False,
) -> None:
    """Write a synthetic CKD cohort (the embedded default) as a MEDS directory."""
    from features.events import write_meds
    from features.simulate import CODES, simulate_cohort

    with _errors():
        t0 = time.perf_counter()
        events = simulate_cohort(subjects, seed=seed)
        write_meds(events, out_dir, shard_subjects=shard_subjects, codes=CODES,
                   overwrite=overwrite, dataset={
                       "dataset_name": "twincast-synthetic-ckd",
                       "dataset_version": f"subjects={subjects},seed={seed}"})
        console.print(f"wrote {len(events):,} events of {subjects:,} subjects to {out_dir} "
                      f"in {time.perf_counter() - t0:.1f}s")


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


@app.command("features")
def features_cmd(
    events: Annotated[Path, typer.Option(help="MEDS directory or parquet file")],
    task: Annotated[Path, typer.Option(help="task YAML")],
    out_file: Annotated[Path, typer.Option("--out", help="training set (parquet) to write")],
) -> None:
    """Build the point-in-time training set of a task: labels, features and split."""
    with _errors():
        summary = build_training_set(events, task, out_file)
        _print_summary(summary)


def build_training_set(events: Path, task_path: Path, out_file: Path):
    from features.events import open_meds
    from features.pipeline import write_training_set
    from features.task import load_task

    task = load_task(task_path)
    dataset = open_meds(events)
    import pyarrow.parquet as pq

    total = sum(pq.ParquetFile(f).metadata.num_rows for f in dataset.files)
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


@app.command()
def demo(
    subjects: Annotated[int, typer.Option(min=100)] = 5000,
    seed: int = 0,
) -> None:
    """The main job on the embedded default: simulate a cohort, build its training set."""
    settings = Settings()
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


if __name__ == "__main__":
    app()
