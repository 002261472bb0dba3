"""Hugging Face formats in and out. `export_hf`: a model folder as a `transformers` folder (Llama for
MiniMind2, Qwen3 or Qwen3-MoE for minimind-3), which vLLM, llama.cpp and Ollama take. `import_model`
(`minimind import`): the checkpoints people bring from MiniMind itself, as a model folder that every
stage, `chat`, `export-hf` and Serve take (model.safetensors + config.json + tokenizer files).

Sources:
- a MiniMind `.pth` from its trainers (`pretrain_512.pth`, `full_sft_512.pth`, `*_moe.pth`): a state
  dict in either naming era. MiniMind2's names are ours; the older ones (`tok_embeddings`,
  `attention.wq`, `feed_forward.w1`, `attention_norm`, `ffn_norm`, `output`) are renamed. The tensor
  shapes give the model's shape and the keys show MoE; `overrides` set what shapes cannot tell (MiniMind
  always uses 8 query heads, so that is the default);
- a MiniMind `transformers` folder: its own `config.json` fields (`use_moe`, `n_routed_experts`,
  `num_experts_per_tok`, `n_shared_experts`, `rope_theta`, ...) mapped to ours;
- a Llama-format folder (`LlamaForCausalLM`: the same parameter names as ours);
- a Qwen3 or Qwen3-MoE folder (minimind-3 as `export_hf` and MiniMind's own export write it): the same
  names, except that each layer's experts are fused (`experts.gate_up_proj`, `experts.down_proj`).

Weights are read without unpickling code (`torch.load(weights_only=True)` or safetensors). minimind-3's
QK-norm weights map onto `qk_norm` and give the head size. Whatever has no place in this architecture
(biases, an untied output head, another router) is refused with the keys or fields named, never dropped.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from minimind.model.checkpoint import TIED_KEYS, TOKENIZER_FILES, load_model, save_model
from minimind.model.config import ModelConfig
from minimind.model.model import MiniMindForCausalLM
from minimind.model.tokenizer import Markers, load_tokenizer

LEGACY_NAMES = (  # MiniMind before 2025-04 -> MiniMind2 (= ours)
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attention\.wq\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^layers\.(\d+)\.attention\.wk\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^layers\.(\d+)\.attention\.wv\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.feed_forward\.(experts\.\d+\.)?w1\.", r"model.layers.\1.mlp.\2gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.(experts\.\d+\.)?w2\.", r"model.layers.\1.mlp.\2down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.(experts\.\d+\.)?w3\.", r"model.layers.\1.mlp.\2up_proj."),
    (r"^layers\.(\d+)\.feed_forward\.shared_experts\.w1\.", r"model.layers.\1.mlp.shared_experts.0.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.shared_experts\.w2\.", r"model.layers.\1.mlp.shared_experts.0.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.shared_experts\.w3\.", r"model.layers.\1.mlp.shared_experts.0.up_proj."),
    (r"^layers\.(\d+)\.feed_forward\.gate\.", r"model.layers.\1.mlp.gate."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
)
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|freqs_cos|freqs_sin|\.mask)$")  # recomputed buffers, not weights


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.pth`/`.pt`/`.bin` (weights only) or `.safetensors` file, or a folder's weight
    files (sharded ones included)."""
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("*.pth"))
        if not files:
            raise FileNotFoundError(f"{path} holds no weights (*.safetensors, pytorch_model*.bin or *.pth)")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(read_weights(file))
        return state
    if path.suffix == ".safetensors":
        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]  # a resume file: {"model": state_dict, "optimizer": ..., ...}
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return loaded


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-MoE's fused experts as one gate/up/down projection per expert (`qwen3_state` in reverse)."""
    state = dict(state)
    for key in [key for key in state if key.endswith("mlp.experts.gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        gate_up, down = state.pop(key), state.pop(prefix + "down_proj")
        for expert, (pair, projection) in enumerate(zip(gate_up, down)):
            gate, up = pair.chunk(2)
            state |= {f"{prefix}{expert}.gate_proj.weight": gate, f"{prefix}{expert}.up_proj.weight": up,
                      f"{prefix}{expert}.down_proj.weight": projection}
    return state


def rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiniMind2 names for a pre-2025-04 state dict (a MiniMind2 one passes through unchanged); also drops
    the `module.`/`_orig_mod.` prefixes DDP and torch.compile leave in saved names."""
    renamed = {}
    for key, tensor in state.items():
        key = re.sub(r"^(module\.|_orig_mod\.)+", "", key)
        for pattern, replacement in LEGACY_NAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def query_heads(state: dict[str, torch.Tensor], overrides: dict) -> tuple[int, int]:
    """(query heads, head size). Shapes alone cannot tell one from the other: minimind-3's QK-norm weights
    give the head size; without them 8 heads are assumed, as in every MiniMind preset, and the
    assumption is printed with the way to change it (--config-overrides num_attention_heads=N)."""
    rows = state["model.layers.0.self_attn.q_proj.weight"].shape[0]
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    if q_norm is not None:
        head_dim = q_norm.shape[0]
        heads = overrides.get("num_attention_heads", rows // head_dim)
    else:
        heads = overrides.get("num_attention_heads", 8)
        head_dim = rows // heads
        if "num_attention_heads" not in overrides:
            print(f"minimind import: assuming {heads} query heads of size {head_dim} (every MiniMind preset has 8; the "
                  "weights cannot tell): if yours differ, pass --config-overrides num_attention_heads=N")
    if rows != heads * head_dim:
        raise ValueError(f"q_proj has {rows} rows: not {heads} query heads of size {head_dim}")
    return heads, head_dim


def config_from_shapes(state: dict[str, torch.Tensor], overrides: dict) -> ModelConfig:
    """The model's shape read off its tensors; `overrides` (e.g. num_attention_heads) win. QK-norm
    weights mark the minimind-3 generation: its RMSNorm eps (1e-6) and its router (top-k renormalised,
    as Qwen3-MoE's) come with it."""
    vocab_size, hidden_size = state["model.embed_tokens.weight"].shape
    layers = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    heads, head_dim = query_heads(state, overrides)
    first = "model.layers.0."
    experts = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", key))}
    shared = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", key))}
    ffn = f"{first}mlp.experts.0." if experts else f"{first}mlp."
    kv_rows = state[f"{first}self_attn.k_proj.weight"].shape[0]
    if kv_rows % head_dim:
        raise ValueError(f"k_proj has {kv_rows} rows: no whole number of key heads of size {head_dim}")
    qk_norm = f"{first}self_attn.q_norm.weight" in state
    values = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=len(layers), num_attention_heads=heads,
        num_key_value_heads=kv_rows // head_dim, attention_head_dim=0 if heads * head_dim == hidden_size else head_dim,
        intermediate_size=state[f"{ffn}gate_proj.weight"].shape[0], qk_norm=qk_norm,
        num_experts=len(experts), num_shared_experts=len(shared),
    )
    if qk_norm:
        values |= {"rms_norm_eps": 1e-6, "norm_topk_prob": True if experts else None}
    if experts and "num_experts_per_tok" not in overrides:  # the router's weights cannot tell how many it picks
        values["num_experts_per_tok"] = 1 if qk_norm else 2
        generation = "minimind-3-moe" if qk_norm else "MiniMind2-MoE"
        print(f"minimind import: assuming each token goes to its top {values['num_experts_per_tok']} experts, as {generation}'s "
              "(the weights cannot tell): if yours differ, pass --config-overrides num_experts_per_tok=K")
    return ModelConfig(**{**values, **overrides})


# MiniMind's, Llama's and Qwen3's config.json fields -> ours; anything else that changes the computation is refused
HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps", "num_experts_per_tok": "num_experts_per_tok",
    "n_shared_experts": "num_shared_experts", "aux_loss_alpha": "aux_loss_alpha", "router_aux_loss_coef": "aux_loss_alpha",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
}


def config_from_hf(fields: dict, state: dict[str, torch.Tensor], overrides: dict) -> ModelConfig:
    """Our config from a MiniMind, Llama or Qwen3 `config.json`, checked against what this architecture computes."""
    refused = []
    if fields.get("attention_bias") or fields.get("mlp_bias"):
        refused.append("attention_bias/mlp_bias (our linears have no bias)")
    if fields.get("hidden_act", "silu") != "silu":
        refused.append(f"hidden_act={fields['hidden_act']!r} (SwiGLU uses silu)")
    if fields.get("scoring_func", "softmax") != "softmax":
        refused.append(f"scoring_func={fields['scoring_func']!r} (the router is a softmax)")
    if fields.get("use_sliding_window"):
        refused.append("use_sliding_window (attention here sees the whole context)")
    if fields.get("decoder_sparse_step", 1) != 1 or fields.get("mlp_only_layers"):
        refused.append("decoder_sparse_step/mlp_only_layers (here every layer's FFN is the MoE)")
    rope = fields.get("rope_scaling") or fields.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        refused.append(f"rope type {rope_type!r} (default and yarn are supported)")
    if refused:
        raise ValueError("this config has no equivalent here: " + "; ".join(refused))
    values = {ours: fields[theirs] for theirs, ours in HF_FIELDS.items() if fields.get(theirs) is not None}
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = values["eos_token_id"][0]
    values.setdefault("rope_theta", rope.get("rope_theta", 1e6))
    if rope_type == "yarn":
        values["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    # MiniMind's config names its experts `n_routed_experts` behind `use_moe`; Qwen3-MoE's, `num_experts`
    # (transformers 5 writes `num_local_experts`)
    values["num_experts"] = (fields.get("n_routed_experts", 0) if fields.get("use_moe")
                             else fields.get("num_experts") or fields.get("num_local_experts") or 0)
    if values["num_experts"] and fields.get("moe_intermediate_size"):
        values["intermediate_size"] = fields["moe_intermediate_size"]
    if not values["num_experts"]:
        values.pop("num_shared_experts", None)
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in state  # minimind-3: QK-norm, a head size of its own
    head_dim = fields.get("head_dim") or values.get("hidden_size", 0) // values.get("num_attention_heads", 8)
    if head_dim * values.get("num_attention_heads", 8) != values.get("hidden_size"):
        values["attention_head_dim"] = head_dim
    values["qk_norm"] = qk_norm
    if values["num_experts"]:  # MiniMind2 renormalises only top-k > 1 (None); minimind-3 always, as Qwen3-MoE
        values["norm_topk_prob"] = (fields.get("norm_topk_prob", True) if qk_norm
                                    else None if fields.get("norm_topk_prob", True) else False)
    if "intermediate_size" not in values or not values["intermediate_size"]:
        values["intermediate_size"] = config_from_shapes(
            state, {"num_attention_heads": values.get("num_attention_heads", 8)}
        ).intermediate_size
    return ModelConfig(**{**values, **overrides})


def import_model(
    source: str | Path,
    destination: str | Path,
    tokenizer_dir: str | Path | None = None,
    overrides: dict | None = None,
    markers: dict[str, str] | None = None,
) -> Path:
    """Write `destination` as a model folder from a MiniMind `.pth`, a MiniMind `transformers` folder, a
    Llama folder or a Qwen3(-MoE) folder; its logits equal the source model's. `markers` name the tokenizer's strings for the
    tags and the image placeholder (`minimind.model.tokenizer.Markers`), kept in the folder's tokenizer config.
    Returns the folder."""
    source, overrides = Path(source), dict(overrides or {})
    state = unfuse_experts(rename_legacy(read_weights(source)))
    state = {key: tensor for key, tensor in state.items() if not IGNORED_KEYS.search(key)}
    unmappable = sorted(key for key in state if re.search(r"\.bias$", key))
    if unmappable:
        raise ValueError(
            f"{source}: {len(unmappable)} tensors have no place in this architecture (biases), "
            f"e.g. {', '.join(unmappable[:4])}"
        )
    hf_config = source / "config.json" if source.is_dir() else None
    if hf_config is not None and hf_config.is_file():
        config = config_from_hf(json.loads(hf_config.read_text()), state, overrides)
    else:
        config = config_from_shapes(state, overrides)

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else (source if source.is_dir() else None)
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(
            f"{source} comes without a tokenizer: pass --tokenizer (MiniMind's tokenizer folder, `model/` in its "
            "repository, or any folder with tokenizer.json)"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    if markers:
        Markers.configure(tokenizer, markers)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only {config.vocab_size}")
    for name in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None and f"{name}_token_id" not in overrides:
            setattr(config, f"{name}_token_id", token_id)

    head, embedding = state.get("lm_head.weight"), state["model.embed_tokens.weight"]
    if head is not None and not torch.equal(head, embedding):
        raise ValueError(f"{source}: lm_head.weight differs from model.embed_tokens.weight; this architecture ties them")
    model = MiniMindForCausalLM(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that disagree with the config
        raise ValueError(f"{source} does not fit {config}: {error}") from error
    missing = [key for key in missing if key not in TIED_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not map onto a {config.num_hidden_layers}-layer model of this architecture: "
            f"missing {missing[:6]}, unexpected {sorted(unexpected)[:6]}"
        )
    return save_model(model, destination, tokenizer=tokenizer)


def transformers_fields(config: ModelConfig) -> dict:
    """The config fields a transformers Llama or Qwen3 shares with ours: shape, norms, RoPE, tied head."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_type": "yarn", "rope_theta": config.rope_theta}
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
        hidden_act="silu", attention_bias=False, tie_word_embeddings=True,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )


def llama_config(config: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(**transformers_fields(config), mlp_bias=False)


def qwen3_config(config: ModelConfig):
    """transformers' Qwen3Config (Qwen3MoeConfig for an MoE) of a minimind-3 model's shape."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    if config.num_shared_experts:
        raise ValueError("Qwen3-MoE has no shared experts: a model with them has no Qwen3 equivalent")
    if not config.is_moe:
        return Qwen3Config(**transformers_fields(config))
    return Qwen3MoeConfig(**transformers_fields(config), moe_intermediate_size=config.intermediate_size,
                          num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                          norm_topk_prob=config.renormalises_top_k, router_aux_loss_coef=config.aux_loss_alpha)


def qwen3_state(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our parameters under Qwen3's names: the same ones, except that Qwen3-MoE keeps each layer's experts
    fused (gate and up stacked into `experts.gate_up_proj`, then `experts.down_proj`)."""
    state = dict(model.state_dict())
    for layer in range(model.config.num_hidden_layers if model.config.is_moe else 0):
        prefix = f"model.layers.{layer}.mlp."
        experts = [f"{prefix}experts.{e}." for e in range(model.config.num_experts)]
        state[prefix + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([state.pop(e + "gate_proj.weight"), state.pop(e + "up_proj.weight")]) for e in experts])
        state[prefix + "experts.down_proj"] = torch.stack([state.pop(e + "down_proj.weight") for e in experts])
    return state


def export_hf(source: str | Path, destination: str | Path) -> Path:
    """Write `destination` as a Hugging Face folder with the same weights: LlamaForCausalLM for MiniMind2,
    Qwen3ForCausalLM (Qwen3MoeForCausalLM for its MoE) for minimind-3, whose QK-norm Llama lacks.

    Our architecture is theirs (RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head) and our parameter
    names are theirs, so the export copies tensors one to one. MiniMind2's MoE (shared experts, no QK-norm)
    has no equivalent in either and is refused.
    """
    from transformers import GenerationConfig, LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    source, destination = Path(source), Path(destination)
    model = load_model(source)
    config = model.config
    if config.qk_norm:
        hf_model = (Qwen3MoeForCausalLM if config.is_moe else Qwen3ForCausalLM)(qwen3_config(config))
        state, family = qwen3_state(model), "Qwen3"
    elif config.is_moe:
        raise ValueError(
            f"{source} is a MiniMind2 Mixture-of-Experts model ({config.num_experts} experts, "
            f"{config.num_shared_experts} shared); Llama has no MoE layers, so only dense MiniMind models can be exported "
            "to Hugging Face format (minimind-3 ones, MoE included, export as Qwen3)"
        )
    else:
        hf_model, state, family = LlamaForCausalLM(llama_config(config)), model.state_dict(), "Llama"
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if [name for name in missing if name not in TIED_KEYS] or unexpected:
        raise RuntimeError(f"parameter names differ from {family}'s: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    hf_model.save_pretrained(str(destination))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    return destination
