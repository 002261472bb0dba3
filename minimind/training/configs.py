"""Each stage job's settings: `TrainConfig`, the flags every stage shares, and each stage's own defaults and fields.
The job scripts in jobs/ turn these into flags; tune/ and the pipeline build them directly."""

from __future__ import annotations

from dataclasses import dataclass

from minimind.training.flags import option


@dataclass
class TrainConfig:
    """Flags shared by every stage job; each job subclasses it with its own defaults."""

    data: str | None = option("training JSONL or Parquet (a .parquet file or folder); default: the demo world's", default=None)
    eval_data: str | None = option("held-out JSONL for the stage's evaluation (default: the demo's)", default=None)
    init: str | None = option(
        "model to start from: models:/NAME/latest|VERSION, models:/NAME@ALIAS, runs:/..., or a directory", default=None
    )
    preset: str = option("model shape when training from scratch (pretrain)", default="demo")
    tokenizer: str | None = option(
        "tokenizer directory or models:/ URI when training from scratch (default: the demo tokenizer)", default=None
    )
    seq_len: int = option("longest row in tokens", default=256)
    batch_size: int = option("rows per micro-batch per worker", default=16)
    grad_accum: int = option("micro-batches per optimiser step", default=1)
    lr: float = option("peak learning rate", default=1e-3)
    min_lr_ratio: float = option("the cosine schedule ends at this fraction of lr", default=0.1)
    warmup_steps: int = option("linear warmup steps", default=0)
    weight_decay: float = option("AdamW weight decay", default=0.01)
    grad_clip: float = option("clip the global gradient norm to this (0: off)", default=1.0)
    epochs: int = option("passes over the data (ignored when --max-steps is set)", default=1)
    max_steps: int = option("stop after this many optimiser steps (0: --epochs decide)", default=0)
    dtype: str = option("bf16 (autocast) or fp32", default="bf16")
    num_workers: int = option("Ray Train workers (DDP when > 1)", default=1)
    use_gpu: bool | None = option(
        "GPUs for the workers, waiting for the autoscaler to provide them (default: when the cluster has or "
        "can launch GPU nodes)",
        off_flag="--cpu",
        default=None,
    )
    gpus_per_worker: float = option("GPUs per worker; a fraction lets Tune trials share one GPU", default=1.0)
    cpus_per_worker: float = option(
        "CPUs per worker (torch threads: at least one); 0: 2 for a GPU worker, a CPU node's CPUs shared among the workers",
        default=0.0,
    )
    checkpoint_every: int = option("report a checkpoint every N optimiser steps (and at the end)", default=50)
    max_failures: int = option("worker failures Ray recovers from by restarting from the last checkpoint", default=2)
    resume: bool = option("continue the newest run of this stage from its last checkpoint", default=False)
    stop_after: int = option(
        "stop this invocation after N steps with a checkpoint, to continue later with --resume (0: run to the end)", default=0
    )
    storage_path: str | None = option("where Ray Train keeps checkpoints (shared storage for several nodes)", default=None)
    experiment: str = option("MLflow experiment", default="minimind")
    register_as: str | None = option("registered model name (default: the stage's own)", default=None)
    alias: str | None = option("also point this alias of the registered model at the new version", default=None)
    skip_bad: bool = option("skip malformed data lines (counted) instead of failing", default=False)
    drop_duplicates: bool = option("leave out records that exactly repeat an earlier one of the file", default=False)
    prepared: str | None = option(
        "where prepared data (token shards + manifest + data report) is kept: a folder or storage URI every "
        "node reads (default: <storage-path>/prepared)",
        default=None,
    )
    compile: bool = option(
        "torch.compile the model being trained (inductor): faster steps on a GPU after a one-off compile", default=False
    )
    loader_workers: int = option(
        "DataLoader processes per worker that collate batches (and decode images) off the training thread; "
        "0: on it; -1: one on GPU or for images, none for text on CPU (where torch's threads use every core)",
        default=-1,
    )
    log_every: int = option("log a line and MLflow metrics every N steps", default=10)
    eval_limit: int = option("evaluate on at most this many held-out records", default=1000)
    val_every: int = option(
        "also compute the held-out loss every N steps in training, logged as val/loss and reported to Ray (0: off)", default=0
    )
    config_overrides: str | None = option(
        "model fields to override when training from scratch, e.g. num_experts=4,num_experts_per_tok=1", default=None
    )
    seed: int = option("random seed", default=0)
    lora_rank: int = option(
        "train low-rank adapters of this rank on the --lora-targets projections, the model itself frozen; "
        "checkpoints and the registered version hold only the adapters and name their base (0: train the whole model)",
        default=0,
    )
    lora_alpha: float = option("LoRA's scale: the adapters add alpha/rank * B A to each weight", default=16.0)
    lora_dropout: float = option("dropout on the LoRA branch's input", default=0.0)
    lora_targets: str = option(
        "projections that get adapters: attention, ffn, all, or names such as q_proj,v_proj", default="all"
    )
    merge: bool = option("with --lora-rank: register the base with the adapters merged in, a plain model folder", default=False)


@dataclass
class PretrainConfig(TrainConfig):
    lr: float = 2e-3
    epochs: int = 3
    warmup_steps: int = 20


@dataclass
class SFTConfig(TrainConfig):
    lr: float = 1e-3
    epochs: int = 2


@dataclass
class ToolsConfig(SFTConfig):
    answer_eval: str | None = option(
        "held-out SFT JSONL whose answer accuracy tool training should keep (default: the demo's, with the demo data)",
        default=None,
    )
    seq_len: int = 512  # a demo chat that lists its two tools takes 285 to 375 tokens of the demo tokenizer
    lr: float = 1e-3


@dataclass
class DPOConfig(TrainConfig):
    beta: float = option("DPO temperature: how far the policy may move from the reference", default=0.5)
    # 4.0: on the demo, plain DPO (0) cost 0.155 of SFT's answer exact match, 1.0 cost 0.065 and 4.0 cost 0.020
    rpo_alpha: float = option(
        "weight of the chosen replies' negative log-likelihood added to the DPO loss (RPO; 0: plain DPO)", default=4.0
    )
    answer_eval: str | None = option(
        "held-out SFT JSONL whose answer accuracy DPO should keep (default: the demo's, with the demo data)", default=None
    )
    lr: float = 1e-4
    batch_size: int = 8


@dataclass
class DistillConfig(TrainConfig):
    mode: str = option("reason (black-box traces) or kd (white-box soft labels)", default="reason")
    answer_eval: str | None = option(
        "held-out SFT JSONL whose answer accuracy distillation should keep (default: the demo's, with the demo data)",
        default=None,
    )
    tag_weight: float = option("reason: loss weight of <think>/</think>/<answer>/</answer>", default=10.0)
    teacher: str | None = option("kd: teacher model URI or directory", default=None)
    alpha: float = option("kd: weight of cross-entropy against the KL term", default=0.5)
    temperature: float = option("kd: softmax temperature of both models", default=1.5)
    lr: float = 1e-3
    epochs: int = 2


@dataclass
class GRPOConfig(TrainConfig):
    rewards: str | None = option(
        "rewards and their weights: answer, format, length, model, call, reply (minimind.rl.rewards); by default "
        "answer=1,format=0.5, with --tools call=1,reply=1",
        default=None,
    )
    tools: str | None = option(
        "tool use (agentic RL): `demo` runs the demo world's tools (add, weather) between a rollout's turns and "
        "trains on its tools_rl.jsonl, from models:/minimind-tools/latest, scored on the held-out tool use "
        "(the job registers minimind-grpo-tools)",
        default=None,
    )
    reward_model: str | None = option(
        "model (URI or folder) whose mean log-probability of a reply is the `model` reward", default=None
    )
    group_size: int = option("completions sampled per prompt: the group their advantages are relative to", default=8)
    max_new_tokens: int = option("token budget of a completion", default=128)
    temperature: float = option(
        "sampling temperature of the rollouts; the policy's, the old policy's and the "
        "reference's log-probabilities are scored at it too (logits / T, as TRL), so the "
        "policy gradient and the ratios are those of the policy that sampled",
        default=1.0,
    )
    top_p: float = option(
        "nucleus sampling of the rollouts (1: off). The log-probabilities are scored on the whole "
        "tempered distribution, not the truncated one (as TRL): below 1, the ratios and the KL "
        "are of the untruncated policy",
        default=1.0,
    )
    kl_coef: float = option("weight of the KL divergence to the starting model (0: no reference model)", default=0.02)
    clip_eps: float = option("grpo: clip range of the policy ratio, [1 - eps, 1 + eps]", default=0.2)
    loss_type: str = option(
        "grpo (PPO's clipped surrogate, averaged per completion) or cispo (MiniMax-M1's "
        "capped, detached importance weights, averaged over all the step's tokens). CISPO's "
        "weights only act with --updates-per-rollout 2 or more: with 1 the ratio is 1 and "
        "cispo is the token-averaged policy gradient",
        default="grpo",
    )
    cispo_max_ratio: float = option(
        "cispo: cap on the importance weight, its own (MiniMax-M1, arXiv:2506.13585, "
        "bounds the weight above only and tunes that bound; caps of 4 to 5 are the usual "
        "setting, far above GRPO's 1 + clip-eps)",
        default=5.0,
    )
    updates_per_rollout: int = option(
        "optimiser steps on each batch of rollouts (more than 1: the ratio and its clip or cap matter)", default=1
    )
    length_limit: int = option("the length reward's limit in tokens", default=110)
    rollout_cpus: float = option("CPUs reserved for the rollout actor (0: it shares the trainer's; they take turns)", default=0.0)
    rollout_gpus: float = option(
        "GPUs of the rollout actor on a GPU cluster; with --gpus-per-worker 0.5 both share one GPU, "
        "with 1 each they run on separate GPUs (or nodes)",
        default=0.5,
    )
    answer_eval: str | None = option(
        "held-out SFT JSONL whose answer accuracy GRPO should keep (default: the demo's, with the demo data)", default=None
    )
    lora_dropout: float = option(
        "kept in the adapters' config for later stages; GRPO trains with dropout off "
        "(as TRL's GRPO), so its ratios and rollouts are of the one policy that samples",
        default=0.0,
    )
    loader_workers: int = option("not for GRPO, which refuses it: it has no data loader (its prompts are read once)", default=-1)
    # on the demo, 200 steps at 1e-5 took held-out additions from 0.77 to 0.83 in 5 minutes (3e-5 for 100 steps: 0.76)
    lr: float = 1e-5
    batch_size: int = 8  # prompts per step and worker
    gpus_per_worker: float = 0.5
    max_steps: int = 200
    checkpoint_every: int = 50
    log_every: int = 5

    seq_len: int | None = option("longest row in tokens (default 256; with --tools the tools stage's 512)", default=None)

    def __post_init__(self):
        if self.rewards is None:
            self.rewards = "call=1,reply=1" if self.tools else "answer=1,format=0.5"
        if self.seq_len is None:
            self.seq_len = ToolsConfig.seq_len if self.tools else TrainConfig.seq_len


@dataclass
class VLMConfig(TrainConfig):
    images: str | None = option(
        "folder (or storage URI) the JSONL's image names are relative to (default: the demo images, or the data file's folder)",
        default=None,
    )
    vision_model: str | None = option(
        "CLIP vision tower: a local folder, hub id or models:/ URI (e.g. jobs/clip.py's "
        "minimind-clip-demo), used when --init is a language model (default: the demo's "
        "random tower, with the demo data)",
        default=None,
    )
    link_vision: bool = option(
        "reference the vision tower by its path instead of copying it into the registered model", default=False
    )
    projector: str = option(
        "a new VLM's projection: linear (MiniMind-V's one bias-free Linear) or mlp (minimind-3v's LayerNorm + 2-layer MLP)",
        default="linear",
    )
    image_tokens: int = option(
        "a new VLM's tokens per image: the tower's patches average-pooled to this square number (minimind-3v: 64); "
        "0: one per patch",
        default=0,
    )
    train_llm: str = option(
        "what of the language model trains besides the projection: none, all, or first-last (its first and last "
        "blocks, minimind-3v's rule)",
        default="none",
    )
    lr: float = 1e-3
    epochs: int = 1


@dataclass
class VLMSFTConfig(VLMConfig):
    train_llm: str = "all"
    lr: float = 5e-4
    epochs: int = 2
