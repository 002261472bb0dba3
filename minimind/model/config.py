"""Model configuration: one dataclass and the named presets of MiniMind2 and minimind-3.

`ModelConfig.from_name("minimind2-small")` gives the 25.8M model; any field can be overridden:
`ModelConfig.from_name("tiny", vocab_size=512)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


def minimind_ffn_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 8/3 of the hidden size rounded up to a multiple of 64."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


def minimind3_ffn_size(hidden_size: int) -> int:
    """minimind-3's SwiGLU width: pi times the hidden size rounded up to a multiple of 64 (2432 at 768)."""
    return 64 * math.ceil(hidden_size * math.pi / 64)


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    attention_head_dim: int = 0  # 0: hidden_size / num_attention_heads (MiniMind2); minimind-3 may set its own
    qk_norm: bool = False  # minimind-3 / Qwen3: RMSNorm over each head's q and k, before RoPE
    intermediate_size: int = 0  # 0: derived from hidden_size with minimind_ffn_size()
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    # YaRN context extension (None = plain RoPE). Keys follow Hugging Face's `rope_parameters`:
    # {"factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1}.
    rope_scaling: dict | None = None
    # Mixture of experts: num_experts == 0 means a dense SwiGLU FFN in every block.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    # Renormalise the chosen experts' router weights to sum to 1: None is MiniMind2's rule (only when top-k > 1),
    # True always (Qwen3-MoE, minimind-3-moe: a top-1 expert gets weight 1), False never.
    norm_topk_prob: bool | None = None
    aux_loss_alpha: float = 0.01
    # Special token ids the model and generation need (the tokenizer is the source of truth).
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict = field(default_factory=dict)  # free-form metadata carried into config.json

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = minimind_ffn_size(self.hidden_size)
        if not self.attention_head_dim and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.num_experts_per_tok}")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def renormalises_top_k(self) -> bool:
        """Whether the chosen experts' router weights are rescaled to sum to 1 (see norm_topk_prob)."""
        return self.num_experts_per_tok > 1 if self.norm_topk_prob is None else self.norm_topk_prob

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        if "hidden_size" in overrides:
            overrides.setdefault("intermediate_size", 0)  # re-derive the FFN width for the new hidden size
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "minimind", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS: dict[str, ModelConfig] = {
    # For tests and the CPU demo: trains in minutes on two cores.
    "tiny": ModelConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048
    ),
    # The embedded demo's default: 2.2M parameters with the demo tokenizer's 747 tokens (2.5M at 2048); a narrow FFN
    # keeps it fast enough to learn the demo world's facts in a few CPU minutes.
    "demo": ModelConfig(
        vocab_size=2048,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        max_position_embeddings=2048,
    ),
    "tiny-moe": ModelConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
    ),
    "minimind2-small": ModelConfig(hidden_size=512, num_hidden_layers=8),  # 25.83M parameters
    "minimind2": ModelConfig(hidden_size=768, num_hidden_layers=16),  # 104.0M
    "minimind2-moe": ModelConfig(  # 145.0M total, 4 routed experts (top-2) + 1 shared
        hidden_size=640,
        num_hidden_layers=8,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
    ),
    # minimind-3 (upstream since 2026-04, aligned with Qwen3): QK-norm, 4 KV heads, a pi-wide FFN, eps 1e-6
    "minimind-3": ModelConfig(hidden_size=768, num_hidden_layers=8, num_key_value_heads=4, qk_norm=True,
                              intermediate_size=minimind3_ffn_size(768), rms_norm_eps=1e-6),  # 63.9M
    "minimind-3-moe": ModelConfig(  # 198M total, 64M active: 4 routed experts, top-1, no shared one (Qwen3-MoE)
        hidden_size=768, num_hidden_layers=8, num_key_value_heads=4, qk_norm=True, intermediate_size=minimind3_ffn_size(768),
        rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=1, norm_topk_prob=True, aux_loss_alpha=5e-4,
    ),
}
# The demo's shape with minimind-3's architecture (`jobs/pipeline.py --generation minimind-3`)
PRESETS["minimind-3-demo"] = replace(PRESETS["demo"], qk_norm=True, rms_norm_eps=1e-6)
