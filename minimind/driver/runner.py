"""The driver side of a stage job: its inputs settled (minimind.driver.inputs: the starting model, the data
checked and prepared before any worker starts), the `TorchTrainer` run, evaluation before and after on
the held-out split, and the result registered.

    flags -> TrainConfig -> run_stage() -> TorchTrainer.fit() -> MLflow run + registered model version
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from minimind import storage, tracking
from minimind.data import report as data_report
from minimind.data.images import load_image
from minimind.data.prepare import Prepared
from minimind.data.rows import StageData
from minimind.driver.cluster import placement, stage_inputs, workers_see_driver_disk
from minimind.driver.inputs import (
    StageInputs,
    check_data,
    check_lora_flags,
    resolve_inputs,
    start_ray,
    storage_path_of,
    with_recorded_lineage,
)
from minimind.driver.stages import STAGES
from minimind.model.checkpoint import save_model
from minimind.model.lora import is_adapter_dir, load_adapter, merge_lora, trainable_count
from minimind.model.vision import copy_vision_tower, is_vlm_dir
from minimind.training.flags import parse_config
from minimind.training.heldout import heldout_rows
from minimind.training.loop import TRAINING_STATE, StageJob, lora_settings


@dataclass
class StageResult:
    stage: str
    model_uri: str
    model_dir: Path
    before: dict
    after: dict
    seconds: float
    run_id: str = ""  # the stage's MLflow run


def evaluate(stage_name: str, model, tokenizer, eval_path: Path | None, limit: int, seq_len: int, reference=None,
             images_dir: Path | None = None, answer_path: Path | None = None) -> tuple[dict, list[dict]]:
    """The held-out metrics of a stage (its `evaluate`, minimind.driver.stages) and a few sample replies.
    Every stage reports the cross-entropy of its held-out text, with rows cut at the stage's own `seq_len`
    as in training; DPO the implicit reward against `reference` (its starting model), the chat stages
    what the greedy replies get right."""
    if eval_path is None:
        return {}, []
    model.eval()
    stage = STAGES[stage_name]
    return stage.evaluate(stage, model, tokenizer, eval_path, limit, seq_len, reference=reference, images_dir=images_dir,
                          answer_path=answer_path)


def eval_coverage(stage_name: str, tokenizer, eval_path: Path | None, limit: int, seq_len: int, image_tokens: int = 1) -> dict:
    """How the stage's `seq_len` treats its held-out rows, as metrics: rows scored, cut short, dropped."""
    if eval_path is None:
        return {}
    _, coverage = heldout_rows(
        eval_path, tokenizer, StageData(STAGES[stage_name].data_kind, seq_len=seq_len, image_tokens=image_tokens), limit
    )
    if coverage["cut"] or coverage["dropped"]:
        print(
            f"[{stage_name}] held-out rows at --seq-len {seq_len}: {coverage['rows']} scored, {coverage['cut']} cut short, "
            f"{coverage['dropped']} dropped (nothing left to score)"
        )
    return {"eval/rows": coverage["rows"], "eval/rows_cut": coverage["cut"], "eval/rows_dropped": coverage["dropped"]}


def _run_name(stage: str, storage_path: str, resume: bool) -> str:
    if resume:
        previous = _earlier_runs(stage, storage_path)
        if not previous:
            raise SystemExit(f"--resume: no earlier {stage} run under {storage_path}")
        return previous[-1]
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _earlier_runs(stage: str, storage_path: str) -> list[str]:
    """Run folder names of this stage under the storage path, oldest first; a local folder or any URI
    Ray Train's storage takes (s3://, gs://, ...), listed through pyarrow like Ray lists it."""
    if not storage.is_uri(storage_path):
        return [p.name for p in sorted(Path(storage_path).glob(f"{stage}-*"), key=lambda p: (p.stat().st_mtime, p.name))]
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = [
        info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(f"{stage}-")
    ]
    return sorted(names)  # the names carry their start time


def run_stage(
    config,
    stage_name: str,
    callbacks: list | None = None,
    register: bool = True,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    params: dict | None = None,
) -> StageResult:
    """One stage job: resolve inputs -> check the data -> evaluate the start -> train -> evaluate -> register.

    For a Tune trial: `callbacks` go to the Ray Train `RunConfig` (its `TuneReportCallback`),
    `parent_run_id` nests the MLflow run under the sweep's, `register=False` leaves registration to the
    sweep (the model is logged to the run as a LoggedModel, and the sweep registers only the best
    trial's), `params` are extra MLflow params (each swept value on its own), and a fixed `run_name`
    makes a restored trial continue its Ray Train run from the last checkpoint."""
    import mlflow

    started = time.perf_counter()
    stage = STAGES[stage_name]
    check_lora_flags(config, stage)
    if stage.check:
        stage.check(config)
    tracking.configure(config.experiment)
    storage_path = storage_path_of(config.storage_path)
    run_name = run_name or _run_name(stage.name, storage_path, config.resume)
    config = with_recorded_lineage(config, stage, run_name) if config.resume else config
    work = (tracking.PROJECT_ROOT / "checkpoints" / "runs" / run_name).resolve()

    config, inputs = resolve_inputs(config, stage, work)
    start_ray()
    prepared, image_tokens = check_data(config, stage, inputs, storage_path, run_name)
    initial = stage.load(inputs.init_dir, "cpu")
    coverage = eval_coverage(stage.name, inputs.tokenizer, inputs.eval_path, config.eval_limit, config.seq_len, image_tokens)
    before, _ = _evaluate(stage, config, inputs, initial, initial)

    config, use_gpu, worker_inputs = _plan_workers(config, stage, inputs, prepared, storage_path, run_name, work)
    with mlflow.start_run(
        run_name=run_name, parent_run_id=parent_run_id, log_system_metrics=True
    ) as run:  # CPU/GPU/memory every 10 s
        settings = {
            **asdict(config),
            "use_gpu": use_gpu,
            **({"images": str(inputs.images_dir)} if inputs.images_dir else {}),
            **(params or {}),
        }
        mlflow.log_params({key: value for key, value in settings.items() if value is not None})
        mlflow.set_tags(
            {
                **inputs.source_tags,
                **(tags or {}),
                "stage": stage.name,
                "ray.run_name": run_name,
                "data.prepared": prepared.location,
                "data.key": prepared.manifest["key"],
                "data.skipped_lines": str(prepared.manifest["skipped_lines"]),
                **({"git.commit": commit} if (commit := tracking.git_commit()) else {}),
            }
        )
        tracking.log_data_file(str(inputs.data_path), prepared.manifest["key"].rsplit("-", 1)[-1], "training")  # the content key
        if inputs.eval_path:
            tracking.log_data_file(str(inputs.eval_path), storage.file_sha256(inputs.eval_path), "evaluation")
        mlflow.log_metrics({key.replace("eval/", "eval_before/"): value for key, value in before.items()} | coverage)
        _log_data_report(prepared)
        language_model = getattr(initial, "language_model", initial)
        mlflow.log_metrics(
            {
                "model/parameters": language_model.num_parameters(),
                "model/active_parameters": language_model.num_parameters(active=True),
            }
        )
        if lora := lora_settings(config):
            mlflow.log_metric("model/trainable_parameters", trainable_count(initial, lora))
        job = StageJob(
            stage,
            config,
            **{key: str(value) if value else None for key, value in worker_inputs.items()},
            mlflow_run_id=run.info.run_id,
            mlflow_tracking_uri=mlflow.get_tracking_uri(),
        )
        result = _train(job, use_gpu, storage_path, run_name, callbacks)
        if not result.metrics.get("finished"):
            print(f"[{stage.name}] stopped at step {result.metrics.get('step')}; continue with --resume (Ray run {run_name})")
            mlflow.set_tag("status", "stopped")
            return StageResult(stage.name, "", Path(), before, {}, time.perf_counter() - started, run.info.run_id)
        final_dir = _final_model(result.checkpoint, work / "model", link_vision=getattr(config, "link_vision", False))

        trained = (
            load_adapter(stage.load(inputs.init_dir, "cpu"), final_dir)
            if is_adapter_dir(final_dir)
            else stage.load(final_dir, "cpu")
        )
        if config.merge:  # the adapters folded into their base: a plain model folder is registered
            final_dir = save_model(merge_lora(trained), work / "model-merged", tokenizer=inputs.tokenizer)
        after, samples = _evaluate(stage, config, inputs, trained, initial)
        _log_results(run.info.run_id, after, samples, pictures=inputs.images_dir is not None)
        version_tags = {**inputs.source_tags, **({"lora.base": config.init} if is_adapter_dir(final_dir) else {})}
        if is_adapter_dir(final_dir) and not config.init.startswith(("models:/", "runs:/")) and not storage.is_uri(config.init):
            print(
                f"[{stage.name}] the adapters name {config.init}, a folder of this machine, as their base: other machines "
                "(Serve replicas, a later stage on another node) cannot apply them. Start from a registered model, or --merge"
            )
        model_uri = _log_and_register(
            final_dir,
            config.register_as or stage.registered_name,
            run.info.run_id,
            alias=config.alias if register else None,
            register=register,
            tags=version_tags,
        )
    seconds = time.perf_counter() - started
    print(
        f"[{stage.name}] {'registered' if register else 'logged'} {model_uri} in {seconds:.0f}s; held-out "
        + ", ".join(f"{key.split('/')[-1]} {before.get(key, float('nan')):.3f} -> {value:.3f}" for key, value in after.items())
    )
    return StageResult(stage.name, model_uri, final_dir, before, after, seconds, run.info.run_id)


def _log_data_report(prepared: Prepared) -> None:
    """The data report on the stage's run: its numbers as data/* metrics, the JSON and the plot as artifacts."""
    import mlflow

    mlflow.log_metrics(data_report.metrics(prepared.report))
    mlflow.log_dict(prepared.report, "data/report.json")
    plot = storage.fetch(storage.join(prepared.location, "report.png"))
    mlflow.log_artifact(str(plot), "data")


def _evaluate(stage, config, inputs: StageInputs, model, reference) -> tuple[dict, list[dict]]:
    return evaluate(
        stage.name,
        model,
        inputs.tokenizer,
        inputs.eval_path,
        config.eval_limit,
        config.seq_len,
        reference=reference,
        images_dir=inputs.images_dir,
        answer_path=inputs.answer_path,
    )


def _plan_workers(config, stage, inputs: StageInputs, prepared: Prepared, storage_path: str, run_name: str, work: Path):
    """Say where MLflow runs go, put the inputs where the workers can read them, and decide GPU or CPU.
    Returns (config with its CPUs per worker, use GPUs, the workers' inputs). The workers read the
    prepared shards, never the JSONL."""
    worker_inputs = {**inputs.for_workers(), "data_path": prepared.location}
    if not workers_see_driver_disk():
        if database := tracking.local_store_path():
            if tracking.in_ray_package(database):
                raise SystemExit(
                    f"the MLflow store {database} lies in Ray's unpacked job folder and would vanish with it: "
                    "set MLFLOW_TRACKING_URI to a tracking server or an absolute sqlite://// path"
                )
            print(
                f"[{stage.name}] MLflow runs go to {database} on {socket.gethostname()}; "
                "set MLFLOW_TRACKING_URI to a tracking server (mlflow/server.sh) to share them across the cluster"
            )
        given = {"data_path": prepared.location, "eval_path": config.eval_data, "images": getattr(config, "images", None)}
        worker_inputs = stage_inputs(
            worker_inputs, storage.join(storage_path, run_name, "inputs"), work, given, on_storage={"data_path"}
        )
    use_gpu, cpus_per_worker, where = placement(config)
    print(f"[{stage.name}] {where}")
    return replace(config, cpus_per_worker=cpus_per_worker), use_gpu, worker_inputs


def _train(job: StageJob, use_gpu: bool, storage_path: str, run_name: str, callbacks: list | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = job.config
    trainer = TorchTrainer(
        job.stage.loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def _final_model(checkpoint, final_dir: Path, link_vision: bool) -> Path:
    """The last checkpoint as the model directory to register (no optimiser state); a VLM gets its
    tower copied in once, unless it is to stay linked."""
    shutil.rmtree(final_dir, ignore_errors=True)
    with checkpoint.as_directory() as checkpoint_dir:
        shutil.copytree(checkpoint_dir, final_dir, ignore=shutil.ignore_patterns(TRAINING_STATE))
    if is_vlm_dir(final_dir) and not link_vision:
        copy_vision_tower(final_dir)  # checkpoints reference the frozen tower; the registered model holds it once
    return final_dir


def _log_results(run_id: str, after: dict, samples: list[dict], pictures: bool) -> None:
    import mlflow

    mlflow.log_metrics(after)
    if samples:
        tracking.log_samples(samples)
    if pictures and (pictured := [row for row in samples if row.get("image")]):
        # the same samples with the pictures themselves, which the MLflow UI shows in the table
        tracking.log_samples(
            [{**row, "image": load_image(row["image"].split(", ")[0])} for row in pictured], "sample_images.json"
        )
    _log_curve(run_id)


def _log_and_register(final_dir: Path, name: str, run_id: str, alias: str | None, register: bool, tags: dict) -> str:
    """The model as a LoggedModel of the run (reachable from every node), registered as the next version
    of `name` unless a sweep registers only its best. Returns its models:/ URI."""
    import mlflow

    model_id = tracking.log_model_dir(final_dir, name, run_id=run_id)
    mlflow.set_tags({"model_dir": str(final_dir), "model_id": model_id})
    if not register:
        return f"models:/{model_id}"
    version = tracking.register_logged_model(model_id, name, alias=alias, tags=tags)
    return f"models:/{name}/{version.version}"


def _log_curve(run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in ("train/loss", "reward/total/mean")
    }
    if any(history.values()):
        tracking.log_loss_curve(history)


def main(stage_name: str, argv=None, description: str | None = None) -> StageResult:
    """A stage job from the command line: its settings class's flags, then `run_stage`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = parse_config(STAGES[stage_name].config_class, argv, description)
    if getattr(config, "tools", None) and f"{stage_name}_tools" in STAGES:  # GRPO with tools: its data, scores and model
        stage_name = f"{stage_name}_tools"
    return run_stage(config, stage_name)
