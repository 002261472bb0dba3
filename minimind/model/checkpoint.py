"""Model directories: `model.safetensors` + `config.json` (+ tokenizer files), and export to a Hugging
Face `LlamaForCausalLM` directory that vLLM, llama.cpp and `transformers` load as is."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minimind.model.config import ModelConfig
from minimind.model.model import MiniMindForCausalLM, unwrap

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TIED_KEYS = ("lm_head.weight",)  # stored once, as model.embed_tokens.weight
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _replace_atomically(write, path: Path) -> None:
    """Write through a temporary file so a crash never leaves a half-written file under the real name."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def save_model(model: MiniMindForCausalLM, directory: str | Path, tokenizer=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items() if name not in TIED_KEYS}
    _replace_atomically(lambda path: save_file(state, str(path), metadata={"format": "pt"}), directory / WEIGHTS_NAME)
    _replace_atomically(model.config.save, directory / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> MiniMindForCausalLM:
    """Rebuild the model from a directory written by `save_model`; safetensors only, nothing unpickled."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a MiniMind model directory: {name} is missing")
    config = ModelConfig.load(directory / CONFIG_NAME)
    model = MiniMindForCausalLM(config)
    state = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in TIED_KEYS]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- Hugging Face export


def llama_config(config: ModelConfig):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_type": "yarn", "rope_theta": config.rope_theta}
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def export_hf(source: str | Path, destination: str | Path) -> Path:
    """Write `destination` as a Hugging Face LlamaForCausalLM directory with the same weights.

    The MiniMind architecture is Llama's (RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head) and our
    parameter names are Llama's, so the export copies tensors one to one. MoE models have no Llama
    equivalent and are refused.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    source, destination = Path(source), Path(destination)
    model = load_model(source)
    config = model.config
    if config.is_moe:
        raise ValueError(
            f"{source} is a Mixture-of-Experts model ({config.num_experts} experts, {config.num_shared_experts} shared); "
            "Llama has no MoE layers, so only dense MiniMind models can be exported to Hugging Face format"
        )
    hf_model = LlamaForCausalLM(llama_config(config))
    missing, unexpected = hf_model.load_state_dict(model.state_dict(), strict=False)
    if [name for name in missing if name not in TIED_KEYS] or unexpected:
        raise RuntimeError(f"parameter names differ from Llama's: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    hf_model.save_pretrained(str(destination))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    return destination
