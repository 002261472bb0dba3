"""What a stage job reads, settled on the driver before any worker starts: its settings checked, its
starting model resolved to one exact version (given eyes for a VLM stage), its data files (the demo
world's by default) and the training data prepared over the cluster, a bad line failing here with its
file and line."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from minimind import storage, tracking
from minimind.data.images import load_image
from minimind.data.parquet import is_parquet, prepare_any
from minimind.data.prepare import Prepared
from minimind.data.shards import PreparedRows
from minimind.demo import demo_data, demo_tokenizer, demo_vision_tower
from minimind.driver.cluster import local_input, workers_see_driver_disk
from minimind.driver.stages import STAGES
from minimind.model.checkpoint import CONFIG_NAME, save_model
from minimind.model.config import ModelConfig
from minimind.model.model import MiniMindForCausalLM
from minimind.model.tokenizer import load_tokenizer
from minimind.model.vision import VISION_CONFIG_NAME, VisionConfig, build_vlm, is_vlm_dir, save_vlm
from minimind.training.flags import parse_overrides
from minimind.training.loop import lora_settings, stage_data


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
        if config.images:
            images_dir = local_input(config.images)
        elif config.data is None:
            images_dir = demo["images"]
        else:  # the data file's folder; Parquet data holds its images
            images_dir = None if is_parquet(data_path) else local_input(data_path.rsplit("/", 1)[0])
        if images_dir is None and eval_path:  # Parquet data holds its images; a JSONL eval file names files
            raise SystemExit("--eval-data with Parquet training data: pass --images, the folder its image files are in")

    init_dir, source_tags = starting_model(config, stage, work)
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


def starting_model(config, stage, work: Path) -> tuple[Path, dict]:
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
        try:
            vlm, tokenizer = build_vlm(init_dir, vision_model, config.seed, config.projector, config.image_tokens or None)
        except ValueError as error:  # an image token count the tower's patch grid cannot pool to
            raise SystemExit(f"--image-tokens: {error}") from None
        save_vlm(vlm, work / "vlm-init", tokenizer, vision_model=vision_model)  # the tower referenced, not copied
        init_dir = work / "vlm-init"
    elif stage.data_kind == "vlm" and (config.projector != "linear" or config.image_tokens):
        shape = VisionConfig.load(init_dir / VISION_CONFIG_NAME)
        if (config.projector, config.image_tokens or shape.image_tokens) != (shape.projector, shape.image_tokens):
            raise SystemExit(
                f"--projector and --image-tokens shape a new VLM; the --init VLM {reference} has its own "
                f"({shape.projector}, {shape.image_tokens} tokens per image): leave them out"
            )
    return init_dir, tags


def with_recorded_lineage(config, stage, run_name: str):
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
    prepared = prepare_any(
        inputs.data_path,
        inputs.tokenizer,
        data,
        root,
        skip_bad=config.skip_bad,
        drop_duplicates=config.drop_duplicates,
        copy_for_tasks=copy_for_tasks,
    )
    if inputs.images_dir:
        check_images(PreparedRows(storage.fetch(prepared.location)).image_names(), inputs.images_dir, inputs.data_path)
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


def check_images(names: set[str], images_dir: Path, data_path: str, decode: int = 200) -> None:
    """Every image the training rows name exists, and the first `decode` of them open as images: fail
    now, naming the file, not in a worker later."""
    names = sorted(names)
    missing = [name for name in names if not (images_dir / name).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} image(s) named in {data_path} are not under {images_dir}, e.g. {missing[0]}")
    for name in names[:decode]:
        load_image(images_dir / name)  # raises ImageError naming the file
    print(f"[{Path(data_path).name}] {len(names)} images found under {images_dir}")


def prepare_data(config, stage_name: str) -> Prepared:
    """The stage's training data prepared (or found prepared) exactly as `run_stage` would, without
    training: a sweep does this on its driver before its trials hold the cluster's CPUs."""
    import tempfile

    stage = STAGES[stage_name]
    with tempfile.TemporaryDirectory() as scratch:
        config, inputs = resolve_inputs(config, stage, Path(scratch))
        start_ray()
        return check_data(config, stage, inputs, storage_path_of(config.storage_path), f"{stage.name}-prepare-{os.getpid()}")[0]


def prepared_root(prepared: str | None, storage_path: str | None) -> str:
    """Where prepared data is kept: --prepared, else <storage-path>/prepared (the project's ray_results locally)."""
    if prepared:
        return prepared if storage.is_uri(prepared) else str(Path(prepared).resolve())
    return storage.join(storage_path_of(storage_path), "prepared")


def storage_path_of(storage_path: str | None) -> str:
    storage_path = storage_path or str(tracking.PROJECT_ROOT / "ray_results")
    return storage_path if storage.is_uri(storage_path) else str(Path(storage_path).resolve())  # s3://... stay URIs


def start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()
