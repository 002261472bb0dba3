"""The one training loop, run by every Ray Train worker of every stage.

bf16 autocast where the device supports it, gradient accumulation that weighs every supervised token of
a step alike (across micro-batches and DDP ranks), AdamW, warmup + cosine schedule to
`min_lr_ratio * lr` (MiniMind's floor is 0.1), gradient clipping, DDP through `prepare_model`, one
compact line per logged step on rank 0, and a checkpoint every `checkpoint_every` steps holding the
model (safetensors; with --lora-rank the adapters only), optimiser, step and RNG state. The batch
order depends only on (seed, epoch), so a resumed run skips exactly the micro-batches already
consumed: no step is trained twice or skipped.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from minimind.data.pixels import BatchWithPixels
from minimind.data.rows import LengthGroupedBatches, StageData, collate
from minimind.data.shards import PreparedRows
from minimind.model.lora import LoRAConfig, add_lora, load_adapter, parse_targets, save_adapter
from minimind.model.model import unwrap
from minimind.model.tokenizer import load_tokenizer
from minimind.storage import fetch
from minimind.training.configs import TrainConfig
from minimind.training.flops import peak_flops
from minimind.training.heldout import heldout_loss
from minimind.training.stages import Stage

TRAINING_STATE = "training_state.pt"


# --------------------------------------------------------------------------- helpers


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def autocast_dtype(config, device: torch.device) -> torch.dtype | None:
    if config.dtype == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


@dataclass
class StageJob:
    """What the driver hands every Ray Train worker: the stage, its typed settings, and where each input
    is. Inputs are URIs on storage every node reaches, or the driver's own paths when the driver started
    the Ray instance itself (then every worker runs on its machine); each worker fetches them."""

    stage: Stage
    config: TrainConfig  # the stage job's own config class (DPOConfig, DistillConfig, ...)
    init_dir: str
    data_path: str
    eval_path: str | None = None
    teacher_dir: str | None = None
    reward_model_dir: str | None = None
    images: str | None = None
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None

    INPUTS = ("init_dir", "data_path", "eval_path", "teacher_dir", "reward_model_dir", "images")

    def fetch_inputs(self) -> None:
        for key in self.INPUTS:
            if getattr(self, key):
                setattr(self, key, str(fetch(getattr(self, key))))


def lora_settings(config) -> LoRAConfig | None:
    """The adapters this job trains, naming its starting model as their base; None: the whole model trains."""
    if not config.lora_rank:
        return None
    return LoRAConfig(
        config.lora_rank, config.lora_alpha, config.lora_dropout, parse_targets(config.lora_targets), base=config.init
    )


def stage_data(stage, config, image_tokens: int = 1) -> StageData:
    """How this stage's records become rows; a VLM expands each image to `image_tokens` (what its tower yields)."""
    tag_weight = getattr(config, "tag_weight", StageData.tag_weight)  # only the reasoning stage has tags to weight
    return StageData(stage.data_kind, seq_len=config.seq_len, tag_weight=tag_weight, image_tokens=image_tokens)


def batch_tokens(batch: dict) -> int:
    """Real (unpadded) tokens of a collated batch, counted by the collate function on the host."""
    return batch["tokens"]


def ddp_options() -> dict:
    """DistributedDataParallel settings. The only buffers are the RoPE tables, computed alike on every
    rank: nothing to re-broadcast before each forward. Every trained parameter gets a gradient in every
    step (an idle MoE expert a zero, a VLM's projection a zero on a text-only batch), so DDP needs no walk
    of the graph for unused ones."""
    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed broadcast_buffers (still syncing once at init, which is harmless here)
    no_broadcast = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return {no_broadcast: False, "find_unused_parameters": False}


def compile_for_training(model) -> None:
    """torch.compile the language model's forward in place: parameter names, checkpoints and DDP's
    wrapping stay as they are. Shapes vary with the length-grouped batches, so they are marked dynamic
    after the first recompilation (torch's default)."""
    language_model = getattr(model, "language_model", model)
    language_model.forward = torch.compile(language_model.forward)


def on_host(metrics: dict) -> dict[str, float]:
    """Metrics as floats; the device's tensors come over in one transfer."""
    names = [key for key, value in metrics.items() if torch.is_tensor(value)]
    fetched = torch.stack([metrics[key].float() for key in names]).tolist() if names else []
    return {**{key: float(value) for key, value in metrics.items() if key not in names}, **dict(zip(names, fetched))}


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver. Not print(): Train V2 patches
    print in workers to also log each message, so every line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _rng_states(world: int) -> list[dict]:
    """Every rank's RNG state in rank order (a collective: every rank calls it), so that each rank of a
    resumed run continues its own random stream."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if world == 1:
        return [state]
    states = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


def _restore_rng(saved, rank: int) -> None:
    state = saved[rank] if isinstance(saved, list) and rank < len(saved) else (saved[0] if isinstance(saved, list) else saved)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- the loop


def model_to_train(job: StageJob, stage, device) -> tuple[torch.nn.Module, LoRAConfig | None]:
    """The stage's starting model on `device` in train mode, with fresh adapters when the job trains LoRA
    (their settings are returned too; None: the whole model trains)."""
    model = stage.load(job.init_dir, device, job.config).train()
    lora = lora_settings(job.config)
    if lora:
        add_lora(model, lora)
    return model, lora


def adamw(model, config, device) -> tuple[list, torch.optim.AdamW]:
    """The trainable parameters and the AdamW that steps them."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused on CUDA: one kernel per step, not several per tensor. (Fused on CPU too would save ~2% of a step,
    # but its rounding differs from foreach's, and the demo's reasoning format swung from 0.99 to 0.65 on it.)
    return params, torch.optim.AdamW(
        params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay, fused=device.type == "cuda"
    )


def resume_from_checkpoint(job: StageJob, stage, model, optimizer, lora: LoRAConfig | None, device, rank: int) -> int:
    """Load Ray Train's latest checkpoint, if this run has one (a restarted worker, or --resume), into the
    model (or its adapters), optimiser and RNGs; returns the step it was taken at (0: none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as directory:
        if lora:
            load_adapter(model, directory)
        else:
            model.load_state_dict(stage.load(directory, device, job.config).state_dict())
        state = torch.load(Path(directory) / TRAINING_STATE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"], rank)
    if rank == 0:
        say(f"[{job.stage.name}] resumed from step {state['step']}")
    return state["step"]


@dataclass
class Worker:
    """Where this Ray Train worker stands: its rank among `world`, its device, the job's tokenizer."""

    rank: int
    world: int
    device: torch.device
    tokenizer: object


def start_worker(job: StageJob) -> Worker:
    """What every loop does first: torch's threads, the seeds of this rank, the job's inputs fetched to
    this node (now paths here), and the tokenizer."""
    import ray.train
    from ray.train.torch import get_device

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.config.cpus_per_worker)))  # Ray pins workers to one thread unless told otherwise
    random.seed(job.config.seed + rank)
    torch.manual_seed(job.config.seed + rank)
    job.fetch_inputs()
    return Worker(rank, world, get_device(), load_tokenizer(job.init_dir))


def optimiser_step(optimizer, params: list, grad_clip: float) -> torch.Tensor:
    """Clip the gradient's global norm (0: no clipping), step, and clear the gradients; returns the norm
    before clipping, on the device."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass(frozen=True)
class StepEvents:
    """What happens after optimiser step `step`: a step line, a held-out loss, a checkpoint, a stop."""

    logging: bool
    validating: bool
    checkpointing: bool
    stopping: bool  # --stop-after: this invocation ends here with a checkpoint, to be resumed

    @classmethod
    def after(cls, step: int, total_steps: int, config) -> StepEvents:
        last = step == total_steps
        stopping = bool(config.stop_after) and config.stop_after <= step < total_steps
        return cls(
            logging=step % config.log_every == 0 or last or step == 1,
            validating=bool(config.val_every) and (step % config.val_every == 0 or last),
            checkpointing=step % config.checkpoint_every == 0 or last or stopping,
            stopping=stopping,
        )


def train_loop_per_worker(loop_config: dict) -> None:
    """`loop_config["job"]` is the driver's `StageJob`."""
    from ray.train.torch import prepare_model

    job: StageJob = loop_config["job"]
    config, stage = job.config, job.stage
    worker = start_worker(job)
    rank, world, device, tokenizer = worker.rank, worker.world, worker.device, worker.tokenizer
    model, lora = model_to_train(job, stage, device)
    rows = PreparedRows(job.data_path, tag_weight=getattr(config, "tag_weight", StageData.tag_weight))  # nothing tokenized here
    batches = LengthGroupedBatches(rows.lengths().tolist(), config.batch_size, seed=config.seed, num_replicas=world, rank=rank)
    steps_per_epoch = max(1, len(batches) // config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    companions = stage.companions(job, device)
    params, optimizer = adamw(model, config, device)

    step = resume_from_checkpoint(job, stage, model, optimizer, lora, device, rank)
    if config.compile:
        compile_for_training(model)
    model = prepare_model(model, parallel_strategy_kwargs=ddp_options())
    amp_dtype = autocast_dtype(config, device)
    flops_per_token = 6 * unwrap(model).num_parameters(active=True)  # attention's FLOPs left out: under 10% at MiniMind's shapes
    peak = 0.0
    if rank == 0:
        peak, peak_source = peak_flops(device, amp_dtype or torch.float32)
        say(f"[{job.stage.name}] MFU is measured against {peak_source}")
    logger = MetricLogger(job, total_steps) if rank == 0 else None

    loader = _loader_settings(stage, model, tokenizer, job, device)

    stream = micro_batches(rows, batches, step * config.grad_accum, loader)
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    while step < total_steps:
        lr = cosine_lr(step, total_steps, config.lr, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        host_batches = [next(stream) for _ in range(config.grad_accum)]
        window_tokens += sum(batch_tokens(batch) for batch in host_batches)
        batches = [on_device(batch, device) for batch in host_batches]
        sums = accumulate_gradients(
            model, stage, batches, companions, job, device, world, amp_dtype
        )  # tensors left on the device
        sums["train/grad_norm"] = optimiser_step(optimizer, params, config.grad_clip)
        step += 1
        events = StepEvents.after(step, total_steps, config)

        if logger and events.logging:
            values = on_host(sums)  # waits for the device: the window's time then covers its work
            seconds = time.perf_counter() - window_start
            tokens_per_s = window_tokens * world / max(seconds, 1e-9)
            logger.log(
                step,
                {
                    **values,
                    "train/lr": lr,
                    "train/tokens_per_s": tokens_per_s,
                    "train/mfu": flops_per_token * tokens_per_s / world / peak,
                },
                time.perf_counter() - started,
            )
            window_tokens, window_start = 0, time.perf_counter()
        validate_and_report(events, step, total_steps, sums, job, worker, model, optimizer, lora, logger)
        if events.stopping:
            break
    stream.close()  # ends the DataLoader's processes
    if logger:
        logger.close()


def validate_and_report(events: StepEvents, step: int, total_steps: int, metrics: dict, job: StageJob, worker: Worker, model,
                        optimizer, lora: LoRAConfig | None, logger: MetricLogger | None) -> None:
    """After optimiser step `step`: the held-out loss when validating (rank 0's is the one that counts), then
    a checkpoint with the step's `metrics` when checkpointing, else a report without one when validating."""
    import ray.train

    if events.validating:
        metrics["val/loss"] = validation_loss(job.stage, model, worker.tokenizer, job) if worker.rank == 0 else 0.0
        if logger:
            logger.log_metrics(step, {"val/loss": metrics["val/loss"]})
    if events.checkpointing:
        report_checkpoint(job.stage, model, worker.tokenizer, optimizer, step,
                          {**on_host(metrics), "finished": float(step == total_steps)}, worker.rank, worker.world, lora)
    elif events.validating:
        ray.train.report({**on_host(metrics), "step": step, "finished": 0.0})  # every rank reports, none with a checkpoint


def on_device(batch: dict, device) -> dict:
    return {key: (value.to(device, non_blocking=True) if torch.is_tensor(value) else value) for key, value in batch.items()}


def accumulate_gradients(
    model, stage, batches: list[dict], companions: dict, job, device, world: int = 1, amp_dtype: torch.dtype | None = None
) -> dict:
    """Forward and backward over the micro-batches of one optimiser step (already on `device`), leaving
    the step's gradient in the parameters; returns the step's metrics as tensors on the device.

    A stage's loss is a mean over its own units (`stage.normalised_over`: supervised tokens, DPO's pairs).
    Each micro-batch's mean is scaled by its share of the units of the whole step on every rank, so the
    gradient is that of one mean over all of them: `--grad-accum 4 --batch-size 4` gives the gradient of
    `--batch-size 16` however unevenly the supervised tokens fall. (Dividing each mean by grad_accum makes
    a token of a sparse micro-batch weigh more than one of a dense one: transformers fixed that in 4.46.)
    The step's count crosses the ranks in one all-reduce on the device, with no wait on the host; the
    `* world` undoes DDP's averaging of the gradients over ranks. An MoE's load-balancing loss, part of
    the stage's loss, rides with its micro-batch's share. The metrics (train/loss first) are this rank's
    micro-batches weighed the same way."""
    counts = torch.stack([stage.loss_count(batch) for batch in batches])
    rank_count = counts.sum()
    step_count = rank_count.clone()
    if world > 1:
        torch.distributed.all_reduce(step_count)
    loss_scales = counts.float() * world / step_count.clamp(min=1).float()
    metric_weights = counts.float() / rank_count.clamp(min=1).float()
    sums: dict = {}
    for index, batch in enumerate(batches):
        sync = index == len(batches) - 1 or world == 1
        with model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext(), autocast_to(device, amp_dtype):
            loss, metrics = stage.loss(model, batch, companions, job)
            (loss * loss_scales[index]).backward()
        for key, value in {"train/loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * metric_weights[index]
    return sums


def micro_batches(rows, batches: LengthGroupedBatches, consumed: int, loader: dict):
    """Every micro-batch after the first `consumed`, epoch after epoch: the same batches, in the same
    order, as an uninterrupted run gets from that point (collated by the DataLoader's processes)."""
    from torch.utils.data import DataLoader

    epoch, skip = divmod(consumed, len(batches))
    while True:
        batches.set_epoch(epoch)
        yield from DataLoader(rows, batch_sampler=list(batches)[skip:], **loader)
        epoch, skip = epoch + 1, 0


def _loader_settings(stage, model, tokenizer, job: StageJob, device) -> dict:
    """DataLoader arguments: collation (and a VLM's image decoding) in `loader_workers` processes, into
    pinned memory on CUDA so the copies to the GPU overlap compute."""
    from functools import partial

    workers = job.config.loader_workers
    if workers < 0:  # a CPU worker's cores all run torch: a collating process would only take time from them
        workers = 1 if device.type == "cuda" or stage.data_kind == "vlm" else 0
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    if stage.data_kind == "vlm":
        collate_fn = BatchWithPixels(collate_fn, unwrap(model).image_processor, job.images)
    return {
        "collate_fn": collate_fn,
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        **({"prefetch_factor": 4, "multiprocessing_context": "fork"} if workers else {}),
    }


def validation_loss(stage, model, tokenizer, job: StageJob) -> float:
    """The held-out loss of the model being trained (the data kinds with labels per token; DPO has none),
    at temperature 1; the model is left in the mode it was in (GRPO trains in eval mode)."""
    if not job.eval_path or stage.data_kind == "dpo":
        return float("nan")
    inner = unwrap(model)
    was_training = inner.training
    loss = heldout_loss(
        inner,
        tokenizer,
        job.eval_path,
        kind=stage.data_kind,
        seq_len=job.config.seq_len,
        limit=job.config.eval_limit,
        images_dir=job.images,
    )  # no_grad and eval mode inside
    inner.train(was_training)
    return loss


def autocast_to(device, amp_dtype: torch.dtype | None):
    """bf16/fp16 autocast on `device`, or nothing when `amp_dtype` is None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def report_checkpoint(
    stage, model, tokenizer, optimizer, step: int, metrics: dict, rank: int, world: int, lora: LoRAConfig | None = None
) -> None:
    import ray.train

    reported = {**metrics, "step": step}
    rng_states = _rng_states(world)
    if rank != 0:
        ray.train.report(reported, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        if lora:
            save_adapter(unwrap(model), directory, lora, tokenizer)  # the adapters only: the base is the job's init
        else:
            stage.save(model, directory, tokenizer)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": rng_states}, Path(directory) / TRAINING_STATE)
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory))


class MetricLogger:
    """Rank 0's compact step line, a progress bar on terminals, and metrics batched to the MLflow run.
    MLflow calls run on a background thread: a slow or briefly unreachable tracking server neither
    stalls nor kills training; a failed batch is reported in the log and training goes on."""

    def __init__(self, job, total_steps: int):
        from concurrent.futures import ThreadPoolExecutor

        self.job, self.total_steps = job, total_steps
        self.client = None
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")  # one thread keeps the order
        self.failures = 0
        uri = job.mlflow_tracking_uri or ""
        local_store = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if job.mlflow_run_id and local_store is not None and not local_store.is_file():
            say(
                f"[{job.stage.name}] the MLflow store {uri} is a file on the driver's machine, not this node's: "
                "step metrics go to the driver's log only (set MLFLOW_TRACKING_URI to a tracking server to record them)"
            )
        elif job.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            os.environ["MLFLOW_TRACKING_URI"] = uri
            self.client = MlflowClient(uri)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=job.stage.name, leave=False)

    def log_metrics(self, step: int, metrics: dict) -> None:
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.sender.submit(self._send, step, batch)

    def _send(self, step: int, batch: list) -> None:
        try:
            self.client.log_batch(self.job.mlflow_run_id, metrics=batch)
        except Exception as error:  # report, never raise into training
            self.failures += 1
            say(
                f"[{self.job.stage.name}] MLflow metrics of step {step} not logged "
                f"({type(error).__name__}: {error}); training goes on"
            )

    def log(self, step: int, metrics: dict, elapsed: float) -> None:
        say(
            f"[{self.job.stage.name}] step {step:5d}/{self.total_steps} | loss {metrics['train/loss']:.4f}"
            f" | lr {metrics['train/lr']:.2e}"
            f" | {metrics['train/tokens_per_s']:,.0f} tok/s | MFU {metrics['train/mfu']:.1%} | {elapsed:.0f}s"
        )
        if self.bar:
            self.bar.update(step - self.bar.n)
        self.log_metrics(step, metrics)

    def close(self) -> None:
        self.sender.shutdown(wait=True)  # what is queued still reaches the run
        if self.bar:
            self.bar.close()
