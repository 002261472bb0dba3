"""Each stage job's settings: `TrainConfig` (minimind.train) with the stage's own defaults and fields.
The job scripts in jobs/ turn these into flags; tune/ and the pipeline build them directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from minimind.train import TrainConfig


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
class DPOConfig(TrainConfig):
    beta: float = field(default=0.5, metadata={"help": "DPO temperature: how far the policy may move from the reference"})
    # 4.0: on the demo, plain DPO (0) cost 0.155 of SFT's answer exact match, 1.0 cost 0.065 and 4.0 cost 0.020
    rpo_alpha: float = field(default=4.0, metadata={"help": "weight of the chosen replies' negative log-likelihood added to the DPO loss (RPO; 0: plain DPO)"})
    answer_eval: str | None = field(default=None, metadata={"help": "held-out SFT JSONL whose answer accuracy DPO should keep (default: the demo's, with the demo data)"})
    lr: float = 1e-4
    batch_size: int = 8


@dataclass
class DistillConfig(TrainConfig):
    mode: str = field(default="reason", metadata={"help": "reason (black-box traces) or kd (white-box soft labels)"})
    answer_eval: str | None = field(default=None, metadata={"help": "held-out SFT JSONL whose answer accuracy distillation should keep (default: the demo's, with the demo data)"})
    tag_weight: float = field(default=10.0, metadata={"help": "reason: loss weight of <think>/</think>/<answer>/</answer>"})
    teacher: str | None = field(default=None, metadata={"help": "kd: teacher model URI or directory"})
    alpha: float = field(default=0.5, metadata={"help": "kd: weight of cross-entropy against the KL term"})
    temperature: float = field(default=1.5, metadata={"help": "kd: softmax temperature of both models"})
    lr: float = 1e-3
    epochs: int = 2


@dataclass
class VLMConfig(TrainConfig):
    images: str | None = field(default=None, metadata={"help": "folder (or storage URI) the JSONL's image names are relative to (default: the demo images, or the data file's folder)"})
    vision_model: str | None = field(default=None, metadata={"help": "CLIP vision tower: a local folder or hub id, used when --init is a language model (default: the demo tower, with the demo data)"})
    link_vision: bool = field(default=False, metadata={"help": "reference the vision tower by its path instead of copying it into the registered model"})
    lr: float = 1e-3
    epochs: int = 1


@dataclass
class VLMSFTConfig(VLMConfig):
    lr: float = 5e-4
    epochs: int = 2
