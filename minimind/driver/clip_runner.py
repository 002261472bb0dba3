"""The CLIP job, driver and workers: contrastive pretraining of MiniMind-V's vision tower (minimind.training.clip)
as a Ray Train run, image->caption retrieval on held-out pictures before and after, and the tower
registered in MLflow (`minimind-clip-demo` on the demo world).

    flags -> ClipConfig -> train_clip() -> TorchTrainer.fit() -> tower folder -> MLflow run + registered version

On the demo world the tower is cached by seed and settings next to the demo's files, so a second run
with the same settings reuses it (and says so) instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from minimind import storage, tracking
from minimind.demo import demo_data, demo_tokenizer, demo_vision_tower
from minimind.driver.cluster import local_input, placement, workers_see_driver_disk
from minimind.driver.runner import StageResult
from minimind.model.model import unwrap
from minimind.model.tokenizer import load_tokenizer
from minimind.training import clip
from minimind.training.flags import option, parse_config

TRAINING_RECORD = "training.json"  # beside the tower's weights: how it was trained and what it scored
DECODED_PICTURES = 20_000  # pictures a worker keeps decoded between steps (64-px: 1 GB); more are decoded per batch
CACHE_FREE = (
    "experiment",
    "storage_path",
    "register_as",
    "alias",
    "reuse",
    "log_every",
    "eval_limit",
)  # settings that leave the weights alone


@dataclass
class ClipConfig:
    data: str | None = option(
        "MiniMind-V pretrain JSONL of image-caption records (default: the demo world's training pictures)", default=None
    )
    images: str | None = option(
        "folder the JSONL's image names are relative to (default: the demo images, or the data file's folder)", default=None
    )
    eval_data: str | None = option(
        "held-out JSONL for image->caption retrieval (default: the demo's; none with --data)", default=None
    )
    vision_model: str | None = option(
        "tower to start from: a folder, models:/ URI or hub id (default: the demo's random tower of --seed)", default=None
    )
    tokenizer: str | None = option(
        "tokenizer of the text encoder: a folder or models:/ URI (default: the demo tokenizer)", default=None
    )
    max_text_len: int = option("caption tokens, eos included (longer captions are cut)", default=64)
    text_width: int = option("hidden size of the text encoder", default=128)
    text_layers: int = option("layers of the text encoder", default=2)
    projection_dim: int = option("size of the shared image-text embedding", default=128)
    batch_size: int = option("pairs per step and worker: the negatives each image is told apart from", default=64)
    lr: float = option("peak learning rate (AdamW, warmup then cosine to a tenth)", default=5e-4)
    warmup_steps: int = option("linear warmup steps (without them the towers can collapse to one embedding)", default=50)
    weight_decay: float = option("AdamW weight decay of the matrices (not of norms, biases or the temperature)", default=0.01)
    max_steps: int = option("optimiser steps", default=200)
    log_every: int = option("print and record the loss every N steps", default=25)
    seed: int = option(
        "the demo world, its tower and tokenizer, the text encoder's initialisation and the batch order", default=0
    )
    eval_limit: int = option("held-out pairs scored for retrieval", default=200)
    num_workers: int = option("Ray Train workers (DDP; each contrasts its own batch)", default=1)
    use_gpu: bool | None = option(
        "GPUs for the workers (default: when the cluster has or can launch GPU nodes)", off_flag="--cpu", default=None
    )
    gpus_per_worker: float = option("GPUs per worker", default=1.0)
    cpus_per_worker: float = option("CPUs per worker (torch threads); 0: as the stage jobs decide", default=0.0)
    storage_path: str | None = option("where Ray Train keeps the run's checkpoint and staged inputs", default=None)
    experiment: str = option("MLflow experiment", default="minimind")
    register_as: str | None = option(
        "registered model name (default: minimind-clip-demo on the demo world, minimind-clip with --data)", default=None
    )
    alias: str | None = option("also point this alias of the registered model at the new version", default=None)
    reuse: bool = option("on the demo world, reuse the tower an earlier run trained with the same settings", default=True)


@dataclass
class ClipJob:
    """What every worker gets: the starting model itself (no path), the pairs' image names and caption ids,
    and where the images are (a folder every worker sees, or a storage URI)."""

    config: ClipConfig
    initial: torch.nn.Module
    image_names: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    groups: torch.Tensor
    images: str


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train.torch import get_device, prepare_model

    job: ClipJob = loop_config["job"]
    config = job.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    torch.manual_seed(config.seed + rank)
    images_dir = storage.fetch(job.images)
    processor = job.initial.processor
    model = prepare_model(job.initial.clip.train()) if world > 1 else job.initial.clip.train().to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    decoded: dict[str, torch.Tensor] = {}  # each picture decoded once per worker (the demo's 2,000 take 100 MB) ...
    keep_decoded = len(set(job.image_names)) <= DECODED_PICTURES  # ... unless there are too many to hold
    order = torch.Generator().manual_seed(config.seed)
    history, started = [], time.perf_counter()
    for step in range(1, config.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config)
        batch = torch.randint(0, len(job.image_names), (world, config.batch_size), generator=order)[
            rank
        ]  # every rank its own pairs
        names = [job.image_names[i] for i in batch.tolist()]
        missing = [name for name in dict.fromkeys(names) if name not in decoded]
        if missing:
            decoded.update(zip(missing, clip.pixels(processor, images_dir, missing)))
        pixel_values = torch.stack([decoded[n] for n in names])
        if not keep_decoded:
            decoded.clear()
        width = int(job.attention_mask[batch].sum(-1).max())
        loss = clip.train_step(
            model,
            optimizer,
            pixel_values.to(device),
            job.input_ids[batch, :width].to(device),
            job.attention_mask[batch, :width].to(device),
            job.groups[batch].to(device),
        )
        if step % config.log_every == 0 or step == config.max_steps:
            seconds = time.perf_counter() - started
            scale = unwrap(model).logit_scale.exp().item()
            history.append(
                {
                    "step": step,
                    "train/loss": loss,
                    "train/lr": _lr(step, config),
                    "train/logit_scale": scale,
                    "train/steps_per_s": step / seconds,
                }
            )
            if rank == 0:
                print(
                    f"[clip] step {step:4d}/{config.max_steps} | loss {loss:.4f} | lr {_lr(step, config):.2e} | "
                    f"scale {scale:.1f} | {step / seconds:.2f} steps/s | {seconds:.0f}s",
                    flush=True,
                )
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            unwrap(model).save_pretrained(directory)
            (Path(directory) / "history.json").write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"step": config.max_steps, "loss": history[-1]["train/loss"]}, checkpoint=checkpoint)


def _lr(step: int, config: ClipConfig) -> float:
    return clip.warmup_cosine(step, config.max_steps, config.lr, config.warmup_steps)


@dataclass
class _Initial:
    """The model a run starts from, with its processor: pickled into the workers' config as it is."""

    clip: torch.nn.Module
    processor: object


@dataclass
class _Inputs:
    train_path: Path
    eval_path: Path | None
    images_dir: Path
    tokenizer_dir: Path
    tower: str  # a folder, or a hub id
    demo_folder: Path | None  # the demo world's folder (the cache lives there), None with --data


def _resolve(config: ClipConfig, work: Path) -> _Inputs:
    demo = None
    if config.data is None:
        demo = demo_data(config.seed)
    elif not config.tokenizer:
        raise SystemExit(
            "--data without --tokenizer: name the tokenizer the text encoder reads captions with (a folder or models:/ URI)"
        )
    train_path = local_input(config.data) if config.data else demo["vlm_pretrain"]
    eval_path = local_input(config.eval_data) if config.eval_data else (demo["vlm_pretrain_eval"] if demo else None)
    images_dir = local_input(config.images) if config.images else (demo["images"] if demo else train_path.parent)
    tokenizer_dir = (
        tracking.resolve_model(config.tokenizer, work / "tokenizer") if config.tokenizer else demo_tokenizer(config.seed)
    )
    tower = config.vision_model or str(demo_vision_tower(config.seed))
    if tower.startswith(("models:/", "runs:/")) or Path(tower).expanduser().is_dir():
        tower = str(tracking.resolve_model(tower, work / "vision-tower"))
    return _Inputs(train_path, eval_path, images_dir, tokenizer_dir, tower, demo["images"].parent if demo else None)


def _pairs(path: Path, images_dir: Path, limit: int | None = None):
    pairs = clip.read_pairs(path)[:limit]
    if not pairs:
        raise SystemExit(f"{path}: no one-image record with an assistant reply to use as a caption")
    missing = [name for name, _ in pairs if not (images_dir / name).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} image(s) named in {path} are not under {images_dir}, e.g. {missing[0]}")
    return [name for name, _ in pairs], [caption for _, caption in pairs]


def _cache_key(config: ClipConfig, inputs: _Inputs) -> str:
    """The settings that decide the weights, the starting tower and the training code, hashed."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in asdict(config).items() if k not in CACHE_FREE}, sort_keys=True).encode())
    digest.update(inputs.tower.encode())
    for module in (clip.__file__, __file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:12]


def _retrieval_metrics(model, processor, images_dir: Path, names: list[str], ids, mask, groups) -> dict[str, float]:
    scores = clip.retrieval(model, clip.pixels(processor, images_dir, names), ids, mask, groups)
    return {
        "eval/image_to_caption_top1": scores["top1"],
        "eval/image_to_caption_top5": scores["top5"],
        "eval/chance": scores["chance"],
    }


def _publish_tower(trained, processor, folder: Path, record: dict) -> None:
    """Write the tower folder beside the final one and rename it into place: no reader sees half of it."""
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    clip.save_tower(trained, processor, partial)
    (partial / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def _register_tower(folder: Path, name: str, run_id: str, alias: str | None, tags: dict) -> str:
    """The tower folder as a LoggedModel of plain files (a tower is no chat model, so not the pyfunc the
    stages log) registered as the next version of `name`. Returns its models:/NAME/VERSION URI."""
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id)
    MlflowClient().log_model_artifacts(logged.model_id, str(folder))
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    version = tracking.register_logged_model(logged.model_id, name, alias=alias, tags=tags)
    return f"models:/{name}/{version.version}"


def _fit(job: ClipJob, use_gpu: bool, storage_path: str, run_name: str):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = job.config
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})},
        ),
        run_config=RunConfig(name=run_name, storage_path=storage_path),
    )
    return trainer.fit()


def _train_and_publish(
    config: ClipConfig,
    inputs: _Inputs,
    tokenizer,
    names,
    captions,
    eval_names,
    eval_captions,
    folder: Path,
    run_name: str,
    key: str,
) -> dict:
    """Score the starting model, train it in Ray Train workers, score the result and publish its tower.
    Returns the training record (settings, before, after, loss history, seconds) saved beside the tower."""
    import ray

    started = time.perf_counter()
    initial, processor = clip.new_clip(
        inputs.tower,
        tokenizer,
        config.max_text_len,
        config.text_width,
        config.text_layers,
        config.projection_dim,
        seed=config.seed,
    )
    scored = (
        eval_names,
        *clip.encode_captions(tokenizer, eval_captions, config.max_text_len),
        clip.caption_groups(eval_captions),
    )
    before = _retrieval_metrics(initial, processor, inputs.images_dir, *scored) if eval_names else {}
    if not ray.is_initialized():
        ray.init()
    use_gpu, cpus_per_worker, where = placement(config)
    print(f"[clip] {where}")
    storage_path = config.storage_path or str(tracking.PROJECT_ROOT / "ray_results")
    storage_path = storage_path if storage.is_uri(storage_path) else str(Path(storage_path).resolve())
    images = str(inputs.images_dir)
    if not workers_see_driver_disk():  # the workers may run on nodes that never saw this machine's disk
        images = storage.stage_input(inputs.images_dir, storage.join(storage_path, run_name, "inputs", "images"))
    job = ClipJob(
        replace(config, cpus_per_worker=cpus_per_worker),
        _Initial(initial, processor),
        names,
        *clip.encode_captions(tokenizer, captions, config.max_text_len),
        clip.caption_groups(captions),
        images,
    )
    result = _fit(job, use_gpu, storage_path, run_name)
    with result.checkpoint.as_directory() as directory:
        from transformers import CLIPModel

        trained = CLIPModel.from_pretrained(directory)
        history = json.loads((Path(directory) / "history.json").read_text())
    after = _retrieval_metrics(trained, processor, inputs.images_dir, *scored) if eval_names else {}
    record = {
        "settings": asdict(config),
        "cache_key": key,
        "tower": inputs.tower,
        "before": before,
        "after": after,
        "history": history,
        "seconds": time.perf_counter() - started,
    }
    _publish_tower(trained, processor, folder, record)
    return record


def train_clip(config: ClipConfig, parent_run_id: str | None = None) -> StageResult:
    """Train (or, on the demo world, reuse) the contrastive tower, score retrieval before and after, and
    register the tower folder. Returns a StageResult of stage "clip" whose model_uri is the version."""
    import mlflow

    started = time.perf_counter()
    tracking.configure(config.experiment)
    run_name = f"clip-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    work = (tracking.PROJECT_ROOT / "checkpoints" / "runs" / run_name).resolve()
    inputs = _resolve(config, work)
    tokenizer = load_tokenizer(inputs.tokenizer_dir)
    names, captions = _pairs(inputs.train_path, inputs.images_dir)
    eval_names, eval_captions = _pairs(inputs.eval_path, inputs.images_dir, config.eval_limit) if inputs.eval_path else ([], [])
    if shared := set(names) & set(eval_names):  # a held-out picture trained on would make its retrieval score meaningless
        raise SystemExit(
            f"{len(shared)} held-out picture(s) of {inputs.eval_path} are in the training data, e.g. {sorted(shared)[0]}"
        )
    print(
        f"[clip] {len(names):,} training pairs from {inputs.train_path}; {len(eval_names)} held-out pairs; tower {inputs.tower}"
    )
    key = _cache_key(config, inputs)
    folder = inputs.demo_folder / f"clip-demo-{key}" if inputs.demo_folder else work / "tower"
    reused = config.reuse and inputs.demo_folder is not None and (folder / TRAINING_RECORD).is_file()
    name = config.register_as or ("minimind-clip-demo" if inputs.demo_folder else "minimind-clip")

    with mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id) as run:
        mlflow.log_params(
            {**{k: v for k, v in asdict(config).items() if v is not None}, "cache_key": key, "train_pairs": len(names)}
        )
        mlflow.set_tags(
            {
                "stage": "clip",
                "source.tower": inputs.tower,
                "clip.reused": str(reused).lower(),
                "ray.run_name": run_name,
                "data.train": str(inputs.train_path),
                **({"data.eval": str(inputs.eval_path)} if inputs.eval_path else {}),
                **({"git.commit": commit} if (commit := tracking.git_commit()) else {}),
            }
        )
        if reused:
            record = json.loads((folder / TRAINING_RECORD).read_text())
            print(f"[clip] reusing the tower trained with these settings: {folder} (--no-reuse trains it again)")
        else:
            record = _train_and_publish(
                config, inputs, tokenizer, names, captions, eval_names, eval_captions, folder, run_name, key
            )
        before, after = record["before"], record["after"]
        mlflow.log_metrics({k.replace("eval/", "eval_before/"): v for k, v in before.items()} | after)
        for row in record["history"]:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        model_uri = _register_tower(
            folder, name, run.info.run_id, config.alias, {"source.tower": inputs.tower, "clip.cache_key": key}
        )
    seconds = time.perf_counter() - started
    print(
        f"[clip] registered {model_uri} ({'reused' if reused else 'trained'} {folder}) in {seconds:.0f}s; held-out "
        + ", ".join(f"{k.split('/')[-1]} {before.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in after.items())
    )
    return StageResult("clip", model_uri, folder, before, after, seconds, run.info.run_id)


def main(argv: list[str] | None = None, description: str | None = None) -> StageResult:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return train_clip(parse_config(ClipConfig, argv, description))
