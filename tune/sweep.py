"""What every sweep shares: a Ray Tune function trial that runs the stage's own job code (`run_stage`,
hence a `TorchTrainer` reporting to Tune through `TuneReportCallback`), one MLflow parent run with a
child run per trial, resumable sweeps (`Tuner.restore`), and at the end a ranked table, a comparison
plot and the best trial's model registered with the alias `best`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "jobs")]

from minimind import tracking  # noqa: E402

PARENT_RUN_FILE = "mlflow_parent_run_id"
TRIAL_FUNCTION_CPUS = 0.5  # the trial's own process: evaluation before/after and the Train controller


@dataclass
class Sweep:
    """How a sweep runs; the flags every sweep script shares."""

    name: str
    num_samples: int = 1
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0  # including TRIAL_FUNCTION_CPUS
    gpus_per_trial: float = 0.0  # a fraction shares one GPU between trials
    resume: bool = False
    experiment: str = "minimind-sweeps"

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, name: str) -> None:
        parser.add_argument("--name", default=name, help="sweep name: Tune's folder and the MLflow parent run (default: %(default)s)")
        parser.add_argument("--num-samples", type=int, default=1, help="samples of the search space; grids are repeated this many times (default: %(default)s)")
        parser.add_argument("--max-concurrent", type=int, default=2, help="trials running at once (default: %(default)s)")
        parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, its training worker gets all but 0.5 (default: %(default)s)")
        parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial's worker; 0.5 runs two trials on one GPU (default: %(default)s)")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this --name instead of starting over")
        parser.add_argument("--experiment", default="minimind-sweeps", help="MLflow experiment (default: %(default)s)")

    @classmethod
    def from_args(cls, args) -> "Sweep":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


def trial(params: dict, stage: str, base_config, parent_run_id: str, environment: dict) -> None:
    """One Tune trial: the stage job with this trial's settings. Runs in a Tune trial actor."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from minimind.config import ModelConfig
    from minimind.runner import run_stage

    os.environ.update(environment)  # the store and project folder of the driver, wherever this runs
    trial_id = ray.tune.get_context().get_trial_id()
    settings = {key: value for key, value in params.items() if key in {f.name for f in fields(base_config)}}
    layout = {key: value for key, value in params.items() if key in {f.name for f in fields(ModelConfig)}}
    if "num_experts_per_tok" in layout and "num_experts" in layout:  # top-k cannot exceed the experts there are
        layout["num_experts_per_tok"] = min(layout["num_experts_per_tok"], layout["num_experts"])
    if layout:
        settings["config_overrides"] = ",".join(f"{key}={value}" for key, value in layout.items())
    run_stage(replace(base_config, **settings), stage, callbacks=[TuneReportCallback()], register=False,
              parent_run_id=parent_run_id, run_name=f"{stage}-{trial_id}", tags={"tune.trial_id": trial_id})


def run_sweep(sweep: Sweep, stage: str, base_config, param_space: dict, tune_config_kwargs: dict):
    """Fit (or restore) the Tuner; returns the MLflow parent run id."""
    import mlflow
    import ray
    from ray import tune

    tracking.configure(sweep.experiment)
    storage = (tracking.PROJECT_ROOT / "tune_results").resolve()
    sweep_dir = storage / sweep.name
    parent_file = storage / f"{sweep.name}.{PARENT_RUN_FILE}"
    restoring = sweep.resume and tune.Tuner.can_restore(str(sweep_dir))
    if sweep.resume and not restoring:
        raise SystemExit(f"--resume: no sweep named {sweep.name!r} under {storage}")
    if restoring:
        parent_run_id = parent_file.read_text().strip()
    else:
        parent = mlflow.start_run(run_name=sweep.name)
        parent_run_id = parent.info.run_id
        mlflow.log_params({"sweep.stage": stage, **{f"sweep.{k}": str(v) for k, v in param_space.items()}, **{
            f"sweep.{f.name}": getattr(sweep, f.name) for f in fields(sweep)}})
        mlflow.end_run()
        storage.mkdir(parents=True, exist_ok=True)
        parent_file.write_text(parent_run_id)

    environment = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MINIMIND_HOME": str(tracking.PROJECT_ROOT)}
    if not ray.is_initialized():
        ray.init()
    # Trials run in other processes, maybe on other nodes, where tune/ and jobs/ are not importable:
    # ship this module's trial function and the job's config class by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(sys.modules[type(base_config).__module__])
    worker_cpus = max(sweep.cpus_per_trial - TRIAL_FUNCTION_CPUS, 0.25)
    base_config = replace(base_config, cpus_per_worker=worker_cpus, experiment=sweep.experiment,
                          use_gpu=sweep.gpus_per_trial > 0, gpus_per_worker=sweep.gpus_per_trial or 1.0)
    trainable = tune.with_resources(
        tune.with_parameters(trial, stage=stage, base_config=base_config, parent_run_id=parent_run_id, environment=environment),
        {"CPU": TRIAL_FUNCTION_CPUS},
    )
    if restoring:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent, **tune_config_kwargs),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage)),
        )
    tuner.fit()
    return parent_run_id


def trial_runs(parent_run_id: str) -> list:
    """The MLflow child runs of a sweep, one per trial (the finished one when a trial was resumed).
    Runs a stopped trial left open are closed as KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)
    by_trial: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")  # ASHA stopped it, or the sweep was interrupted
        trial_id = run.data.tags.get("tune.trial_id", run.info.run_id)
        if trial_id not in by_trial or "model_dir" in run.data.tags:
            by_trial[trial_id] = run
    return list(by_trial.values())


def finish(parent_run_id: str, rows: list[dict], columns: list[str], best: dict | None, register_as: str, plot) -> str | None:
    """Log the ranked table and plot on the parent run, register the best trial's model, print both."""
    import mlflow

    with mlflow.start_run(run_id=parent_run_id):
        tracking.log_samples([{column: row.get(column) for column in columns} for row in rows], artifact_file="ranking.json")
        figure = plot(rows)
        mlflow.log_figure(figure, "comparison.png")
        model_uri = None
        if best is not None:
            version = tracking.register_model_dir(Path(best["model_dir"]), register_as, run_id=best["run_id"], alias="best",
                                                  tags={"sweep.parent_run_id": parent_run_id})
            model_uri = f"models:/{register_as}/{version.version}"
            mlflow.set_tags({"best.run_id": best["run_id"], "best.model_uri": model_uri})
    widths = [max(len(column), *(len(_cell(row.get(column))) for row in rows)) for column in columns]
    print("\n" + "  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(_cell(row.get(column)).ljust(width) for column, width in zip(columns, widths)))
    print(f"\nbest: {model_uri} (alias {register_as}@best)" if model_uri else "\nno trial finished: nothing registered")
    return model_uri


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
