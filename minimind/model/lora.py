"""LoRA: low-rank adapters on the model's linear projections, in plain PyTorch (Hu et al. 2021).

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T        A: rank x in (random), B: out x rank (zeros)

B starts at zero, so an adapted model starts as exactly its base. Only A and B train; W stays frozen,
bit for bit. `LoRALinear` is an `nn.Linear` with two extra parameters, so the base weights keep their
names (`...q_proj.weight`) and the adapters sit beside them (`...q_proj.lora_A`, `...q_proj.lora_B`).

An adapter directory holds `adapter_config.json` (rank, alpha, dropout, targets and the base model's
reference) and `adapter.safetensors` (the A and B matrices only), plus the tokenizer files: megabytes
where the model is tens of them. `merge_lora` folds the adapters into W and gives back a plain model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minimind.model.checkpoint import load_model, save_model
from minimind.model.model import unwrap
from minimind.model.tokenizer import load_tokenizer

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {"attention": ATTENTION_PROJECTIONS, "ffn": FFN_PROJECTIONS, "all": ATTENTION_PROJECTIONS + FFN_PROJECTIONS}


@dataclass
class LoRAConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGET_GROUPS["all"]))  # projection names, e.g. q_proj
    base: str | None = None  # the base model's reference (models:/NAME/VERSION, runs:/..., or a folder)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"a LoRA rank is a positive integer, not {self.rank!r}")
        if not 0 < self.alpha < math.inf:  # 0: adapters that neither act nor train; below 0: reversed
            raise ValueError(f"LoRA's alpha must be positive, not {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA's dropout is a probability in [0, 1), not {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LoRAConfig":
        return cls(**json.loads(Path(path).read_text()))


def parse_targets(text: str) -> list[str]:
    """"attention", "ffn", "all" or projection names, comma-separated: "q_proj,v_proj" -> the names."""
    names = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        group = TARGET_GROUPS.get(part, (part,))
        unknown = [name for name in group if name not in TARGET_GROUPS["all"]]
        if unknown:
            raise ValueError(
                f"unknown LoRA target {part!r}: use attention, ffn, all or some of {', '.join(TARGET_GROUPS['all'])}"
            )
        names += [name for name in group if name not in names]
    if not names:
        raise ValueError("no LoRA targets given")
    return names


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype
        )
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper's code
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_parameters(self) -> None:  # nn.Linear.__init__ calls it; the base weights are set right after
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + self.scaling * update

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.double() @ self.lora_A.double()) * self.scaling  # in float64: one rounding, at the end
        return (self.weight.double() + delta).to(self.weight.dtype)


def _targets(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if child_name in names and isinstance(child, nn.Linear):
                found.append((module, child_name, child))
    return found


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and put a fresh adapter on every target projection (in place; returns the model)."""
    model.requires_grad_(False)
    targets = _targets(model, config.targets)
    if not targets:
        raise ValueError(f"the model has none of the LoRA targets {config.targets}")
    for parent, name, linear in targets:
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter: merge it first")
        setattr(parent, name, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight: a plain model again (in place; returns the model)."""
    for parent, name, linear in _targets(model, TARGET_GROUPS["all"]):
        if isinstance(linear, LoRALinear):
            plain = nn.Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            with torch.no_grad():
                plain.weight.copy_(linear.merged_weight())
                if linear.bias is not None:
                    plain.bias.copy_(linear.bias)
            setattr(parent, name, plain)
    return model


def trainable_count(model: nn.Module, config: LoRAConfig) -> int:
    """Parameters the adapters of `config` would add to `model`: all that trains."""
    return sum(config.rank * (linear.in_features + linear.out_features) for _, _, linear in _targets(model, config.targets))


def merge_adapter_dir(adapter_dir: str | Path, base_dir: str | Path, destination: str | Path) -> Path:
    """A plain model folder: the base model of `base_dir` with the adapters of `adapter_dir` merged in."""
    model = load_adapter(load_model(base_dir), adapter_dir)
    return save_model(merge_lora(model), destination, tokenizer=load_tokenizer(adapter_dir))


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = unwrap(model)
    model = getattr(model, "_orig_mod", model)  # and torch.compile
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items() if ".lora_" in name}


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG_NAME).is_file()


def save_adapter(model: nn.Module, directory: str | Path, config: LoRAConfig, tokenizer=None) -> Path:
    """Write an adapter directory: the A and B matrices and the config naming the base."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save(directory / ADAPTER_CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put an adapter directory's adapters on `model` (a base model, or one with adapters of the same shape)."""
    directory = Path(directory)
    config = LoRAConfig.load(directory / ADAPTER_CONFIG_NAME)
    if not has_lora(model):
        add_lora(model, config)
    state = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS_NAME} does not fit the model: missing {sorted(expected - set(state))[:4]}, "
            f"unexpected {sorted(set(state) - expected)[:4]}"
        )
    model.load_state_dict(state, strict=False)
    return model
