"""Model directories: `model.safetensors` + `config.json` (+ tokenizer files), and export to a Hugging
Face `LlamaForCausalLM` directory that vLLM, llama.cpp and `transformers` load as is."""

from __future__ import annotations

import os
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


