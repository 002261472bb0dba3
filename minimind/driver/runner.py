"""The driver side of a stage job: resolve the starting model, check the data before any worker starts,
run the `TorchTrainer`, evaluate before and after on the held-out split, and register the result.

    flags -> TrainConfig -> run_stage() -> TorchTrainer.fit() -> MLflow run + registered model version
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from minimind import storage, tracking
from minimind.data import report as data_report
from minimind.data.images import load_image
from minimind.data.prepare import Prepared, prepare
from minimind.data.rows import StageData
from minimind.data.shards import PreparedRows
from minimind.demo import demo_data, demo_tokenizer, demo_vision_tower
from minimind.driver.cluster import local_input, placement, stage_inputs, workers_see_driver_disk
from minimind.driver.stages import STAGES
from minimind.model.checkpoint import CONFIG_NAME, save_model
from minimind.model.config import ModelConfig
from minimind.model.lora import is_adapter_dir, load_adapter, merge_lora, trainable_count
from minimind.model.model import MiniMindForCausalLM
from minimind.model.tokenizer import load_tokenizer
from minimind.model.vision import VISION_CONFIG_NAME, VisionConfig, build_vlm, copy_vision_tower, is_vlm_dir, save_vlm
from minimind.training.flags import parse_config, parse_overrides
from minimind.training.heldout import heldout_rows
from minimind.training.loop import TRAINING_STATE, StageJob, lora_settings, stage_data


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


def _check_images(names: set[str], images_dir: Path, data_path: str, decode: int = 200) -> None:
    """Every image the training rows name exists, and the first `decode` of them open as images: fail
    now, naming the file, not in a worker later."""
    names = sorted(names)
    missing = [name for name in names if not (images_dir / name).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} image(s) named in {data_path} are not under {images_dir}, e.g. {missing[0]}")
    for name in names[:decode]:
        load_image(images_dir / name)  # raises ImageError naming the file
    print(f"[{Path(data_path).name}] {len(names)} images found under {images_dir}")


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


def _starting_model(config, stage, work: Path) -> tuple[Path, dict]:
    """The directory the stage starts from, and MLflow tags saying where it came from."""
    if stage.previous is None and config.init is None:
        if config.data and not config.tokenizer:  # the demo's 2,048-token vocabulary is no tokenizer for real text
            raise SystemExit(
                "--data without --tokenizer: train one with jobs/tokenizer.py (or bring MiniMind's) and pass "
                "--tokenizer DIR|models:/...; only the demo data falls back to the demo tokenizer"
            )
        tokenizer_dir = (
            tracking.resolve_model(config.tokenizer, work / "tokenizer") if config.tokenizer else demo_tokenizer(config.seed)
        )
        tokenizer = load_tokenizer(tokenizer_dir)
        model_config = ModelConfig.from_name(
            config.preset,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **parse_overrides(config.config_overrides),
        )
        torch.manual_seed(config.seed)
        save_model(MiniMindForCausalLM(model_config), work / "init", tokenizer=tokenizer)
        return work / "init", {"source.uri": f"scratch:{config.preset}", "tokenizer": str(config.tokenizer or tokenizer_dir)}
    reference = tracking.pin(config.init or f"models:/{stage.previous}/latest")  # resolved once, recorded as lineage.init
    init_dir, tags = (
        tracking.resolve_model(reference, work / "init"),
        {**tracking.model_source(reference), "lineage.init": reference},
    )
    if stage.data_kind == "vlm" and not is_vlm_dir(init_dir):  # a language model: give it eyes
        if config.data and not config.vision_model:  # the demo tower is random: it sees nothing in real pictures
            raise SystemExit(
                "--data with a language model as --init needs --vision-model (a CLIP folder, models:/ URI or hub id such as "
                "openai/clip-vit-base-patch16); only the demo data falls back to the demo tower"
            )
        vision_model = config.vision_model or demo_vision_tower(config.seed)
        tags = {**tags, "vision_model": str(vision_model)}
        if str(vision_model).startswith(("models:/", "runs:/")):  # e.g. models:/minimind-clip-demo/1, jobs/clip.py's tower
            tags["vision_model"] = tracking.pin(vision_model)  # the exact version, recorded
            vision_model = tracking.resolve_model(tags["vision_model"], work / "vision-tower")
        vlm, tokenizer = build_vlm(init_dir, vision_model, seed=config.seed)
        save_vlm(vlm, work / "vlm-init", tokenizer, vision_model=vision_model)  # the tower referenced, not copied
        init_dir = work / "vlm-init"
    return init_dir, tags


@dataclass
class StageInputs:
    """Everything a stage reads, resolved on the driver to paths on this machine (workers get them
    through storage), with the MLflow tags that say where the starting model came from."""

    init_dir: Path
    tokenizer: object
    source_tags: dict
    data_path: str  # the training JSONL: a path on this machine or a storage URI (prepared, never fetched here)
    eval_path: Path | None = None
    answer_path: Path | None = None  # DPO and reasoning: the SFT answers they must keep
    images_dir: Path | None = None
    teacher_dir: Path | None = None
    reward_model_dir: Path | None = None

    def for_workers(self) -> dict:
        return {
            "init_dir": self.init_dir,
            "data_path": self.data_path,
            "eval_path": self.eval_path,
            "teacher_dir": self.teacher_dir,
            "reward_model_dir": self.reward_model_dir,
            "images": self.images_dir,
        }


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
    storage_path = _storage_path(config.storage_path)
    run_name = run_name or _run_name(stage.name, storage_path, config.resume)
    config = _with_recorded_lineage(config, stage, run_name) if config.resume else config
    work = (tracking.PROJECT_ROOT / "checkpoints" / "runs" / run_name).resolve()

    config, inputs = resolve_inputs(config, stage, work)
    _start_ray()
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


def check_lora_flags(config, stage) -> None:
    """LoRA flags that cannot work, refused before anything runs (a worker would fail on them only after
    the data's preparation and the first evaluation, or train adapters that do nothing)."""
    if not config.lora_rank:
        defaults = {field.name: field.default for field in dataclasses.fields(config)}
        given = [
            name for name in ("lora_alpha", "lora_dropout", "lora_targets", "merge") if getattr(config, name) != defaults[name]
        ]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise SystemExit(
                f"{flags}: LoRA settings, which need --lora-rank (without it the whole model trains and they do nothing)"
            )
        return
    if config.lora_rank < 0:
        raise SystemExit(f"--lora-rank must be positive, not {config.lora_rank}")
    if not 0 < config.lora_alpha < math.inf:
        raise SystemExit(
            f"--lora-alpha must be positive, not {config.lora_alpha:g}: the adapters add alpha/rank * B A to each weight, "
            "so at 0 they neither act nor train, and below 0 they act reversed"
        )
    if not 0 <= config.lora_dropout < 1:
        raise SystemExit(
            f"--lora-dropout is the probability of dropping an input of the LoRA branch: in [0, 1), not {config.lora_dropout:g}"
        )
    if stage.data_kind == "vlm":
        raise SystemExit("--lora-rank is for the text stages (pretrain, sft, dpo, reason, kd, grpo), not the VLM's")
    if stage.previous is None and config.init is None:
        raise SystemExit("--lora-rank adapts a trained model: pretraining from scratch has none, so pass --init")
    try:
        lora_settings(config)
    except ValueError as error:
        raise SystemExit(f"--lora-targets: {error}") from None


def _with_recorded_lineage(config, stage, run_name: str):
    """--resume continues with exactly the models the interrupted run resolved, whatever `latest` means now."""
    lineage = tracking.recorded_lineage(run_name)
    if not lineage:
        return config
    print(
        f"[{stage.name}] --resume: the inputs of {run_name}: "
        + ", ".join(f"{k[len('lineage.') :]} {v}" for k, v in lineage.items())
    )
    return replace(
        config,
        init=lineage.get("lineage.init", config.init),
        **{key: lineage[f"lineage.{key}"] for key in ("teacher", "reward_model") if f"lineage.{key}" in lineage},
    )


def resolve_inputs(config, stage, work: Path):
    """The stage's data files (the demo world's when --data is left out), its starting model (exact
    version, resolved once), tokenizer and KD teacher. Returns the config with pinned URIs, and the inputs."""
    demo = None
    if config.data is None:  # the demo world of the run's seed: written once, on first use
        demo = demo_data(config.seed)
    data_path = (
        (config.data if storage.is_uri(config.data) else str(Path(config.data).resolve()))
        if config.data
        else str(demo[stage.demo_file])
    )
    eval_path = (
        local_input(config.eval_data) if config.eval_data else (demo[stage.demo_file + "_eval"] if config.data is None else None)
    )
    answer_path = None
    if stage.keeps_answers and (getattr(config, "answer_eval", None) or config.data is None):
        answer_path = local_input(config.answer_eval) if getattr(config, "answer_eval", None) else demo["sft_eval"]
    images_dir = None
    if stage.data_kind == "vlm":
        images_dir = (
            local_input(config.images)
            if config.images
            else (demo["images"] if config.data is None else local_input(data_path.rsplit("/", 1)[0]))
        )

    init_dir, source_tags = _starting_model(config, stage, work)
    if "lineage.init" in source_tags:  # the exact model, which LoRA adapters name as their base
        reference = source_tags["lineage.init"]
        config = replace(
            config, init=str(Path(reference).expanduser().resolve()) if Path(reference).expanduser().is_dir() else reference
        )
    tokenizer = load_tokenizer(init_dir)
    model_config = ModelConfig.load(init_dir / CONFIG_NAME)
    if len(tokenizer) > model_config.vocab_size:
        raise SystemExit(f"the tokenizer in {init_dir} has {len(tokenizer)} tokens but the model only {model_config.vocab_size}")
    teacher_dir = None
    if stage.needs_teacher:
        if not config.teacher:
            raise SystemExit("--mode kd needs --teacher (a registered model URI or a model directory with the same vocabulary)")
        config = replace(config, teacher=tracking.pin(config.teacher))
        teacher_dir = tracking.resolve_model(config.teacher, work / "teacher")
        source_tags["lineage.teacher"] = config.teacher
    reward_model_dir = None
    if getattr(config, "reward_model", None):
        config = replace(config, reward_model=tracking.pin(config.reward_model))
        reward_model_dir = tracking.resolve_model(config.reward_model, work / "reward-model")
        source_tags["lineage.reward_model"] = config.reward_model
    return config, StageInputs(
        init_dir, tokenizer, source_tags, data_path, eval_path, answer_path, images_dir, teacher_dir, reward_model_dir
    )


def check_data(config, stage, inputs: StageInputs, storage_path: str, run_name: str) -> tuple[Prepared, int]:
    """Prepare the training data over the Ray cluster (or find it prepared) before any worker starts: a
    bad line fails here, naming file and line. Returns (the prepared data, image tokens per image)."""
    image_tokens = VisionConfig.load(inputs.init_dir / VISION_CONFIG_NAME).image_tokens if is_vlm_dir(inputs.init_dir) else 1
    data = stage_data(stage, config, image_tokens)
    root = prepared_root(config.prepared, storage_path)
    copy_for_tasks = None
    if not storage.is_uri(inputs.data_path) and not workers_see_driver_disk():
        # the preparation's tasks run on other nodes: they read a copy on storage, made only when there is work for them
        copy_for_tasks = partial(
            storage.stage_input,
            inputs.data_path,
            storage.join(storage_path, run_name, "inputs", "source", Path(inputs.data_path).name),
        )
    prepared = prepare(
        inputs.data_path,
        inputs.tokenizer,
        data,
        root,
        skip_bad=config.skip_bad,
        drop_duplicates=config.drop_duplicates,
        copy_for_tasks=copy_for_tasks,
    )
    if inputs.images_dir:
        _check_images(PreparedRows(storage.fetch(prepared.location)).image_names(), inputs.images_dir, inputs.data_path)
    manifest = prepared.manifest
    if manifest["rows"] == 0:
        raise SystemExit(
            f"{inputs.data_path}: no training rows from its {manifest['records']:,} records at --seq-len {config.seq_len} "
            "(a row whose reply is cut off entirely has nothing to learn and is left out: raise --seq-len)"
        )
    print(
        f"[{stage.name}] {manifest['rows']:,} training rows ({manifest['tokens']:,} tokens) from {inputs.data_path}"
        + (f" ({manifest['skipped_lines']} malformed lines skipped)" if manifest["skipped_lines"] else "")
    )
    return prepared, image_tokens


def prepare_data(config, stage_name: str) -> Prepared:
    """The stage's training data prepared (or found prepared) exactly as `run_stage` would, without
    training: a sweep does this on its driver before its trials hold the cluster's CPUs."""
    import tempfile

    stage = STAGES[stage_name]
    with tempfile.TemporaryDirectory() as scratch:
        config, inputs = resolve_inputs(config, stage, Path(scratch))
        _start_ray()
        return check_data(config, stage, inputs, _storage_path(config.storage_path), f"{stage.name}-prepare-{os.getpid()}")[0]


def prepared_root(prepared: str | None, storage_path: str | None) -> str:
    """Where prepared data is kept: --prepared, else <storage-path>/prepared (the project's ray_results locally)."""
    if prepared:
        return prepared if storage.is_uri(prepared) else str(Path(prepared).resolve())
    return storage.join(_storage_path(storage_path), "prepared")


def _storage_path(storage_path: str | None) -> str:
    storage_path = storage_path or str(tracking.PROJECT_ROOT / "ray_results")
    return storage_path if storage.is_uri(storage_path) else str(Path(storage_path).resolve())  # s3://... stay URIs


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


def _start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


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


def main(config_class, stage_name: str, argv=None, description: str | None = None) -> StageResult:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return run_stage(parse_config(config_class, argv, description), stage_name)
