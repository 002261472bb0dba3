"""What a training run logs besides metrics: the loss curve, sample replies, the data files it read, the
code's commit, and the parent run of a pipeline or sweep with its result tables."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient

if TYPE_CHECKING:
    pass


def log_loss_curve(history: dict[str, list[tuple[int, float]]], artifact_file: str = "loss_curve.png") -> None:
    """One PNG with every metric's curve against the step, logged to the active run."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    for metric, points in history.items():
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, label=metric, marker="o" if len(points) == 1 else None)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    mlflow.log_figure(figure, artifact_file)


def start_parent_run(experiment_id: str, name: str, params: dict | None = None) -> str:
    """A run that groups others (they start with `parent_run_id` set to the id returned), left open
    while they run and closed by `end_parent_run`."""
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags={"git.commit": commit} if (commit := git_commit()) else None)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def end_parent_run(run_id: str, metrics: dict[str, float], tables: dict[str, list[dict]], failed: bool = False) -> None:
    """Log a parent run's summary metrics and tables (artifact file -> rows) and close it."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        for artifact_file, rows in tables.items():
            if rows:
                log_samples(rows, artifact_file)
        if failed:
            mlflow.end_run(status="FAILED")


def log_samples(rows: list[dict], artifact_file: str = "samples.json") -> None:
    """Rows (e.g. prompt / completion / score) as an MLflow table, viewable and comparable across runs."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(row.get(key) for row in rows)
    mlflow.log_table(data=columns, artifact_file=artifact_file)


CODE_CHECKOUT = Path(__file__).resolve().parents[2]  # the folder above the package: a checkout, or site-packages


def git_commit(root: Path = CODE_CHECKOUT) -> str | None:
    """HEAD of the checkout the code runs from, or None outside one (installed package, no git binary). Not the
    project home's: $MINIMIND_HOME moves the store, not the code (a three-seed report said "unknown")."""
    if not (root / ".git").exists():  # don't report an enclosing repository, such as a dotfiles repo in $HOME
        return None
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def log_data_file(path: str, digest: str, context: str) -> None:
    """Record a data file a run used as an MLflow dataset input (name, digest, source URI), which the run's
    Datasets panel shows and run searches can filter on."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a local path matches two equivalent source types; MLflow warns and picks one
        source = resolve_dataset_source(str(path))
    mlflow.log_input(MetaDataset(source, name=str(path).rstrip("/").rsplit("/", 1)[-1], digest=digest[:32]), context=context)


