"""GGUF export: a model folder as one file that llama.cpp, llama-cpp-python and Ollama load, written with
the `gguf` package (llama.cpp's own writer).

MiniMind2 goes out as llama.cpp's `llama` architecture, minimind-3 as `qwen3` (`qwen3moe` for its MoE): the
same families `export_hf` writes. Two differences from the Hugging Face layout are the file's own:
- llama.cpp's `llama` rotates adjacent pairs of a head's dimensions, ours (and Hugging Face's) its two
  halves, so each head's rows of q_proj and k_proj are reordered to match (`interleave_rope_rows`);
  `qwen3` rotates halves, as we do, and its rows go out unchanged;
- the tokenizer goes in as byte-level BPE (`gpt2`): the vocabulary in id order, the merges, the special
  tokens as control tokens, and the chat template, so llama.cpp tokenizes and formats chats itself.

`quant`: `f16` (2-D weights in float16), `q8_0` (2-D weights in 8-bit blocks of 32, where a row divides
into blocks, float16 where not) or `f32`. Norm weights are float32 in every case, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minimind.model.checkpoint import load_model
from minimind.model.config import ModelConfig
from minimind.model.tokenizer import load_tokenizer

QUANTS = ("f16", "q8_0", "f32")


def architecture(config: ModelConfig, source) -> str:
    """llama.cpp's name for the model's architecture; refuses what it has no equivalent for."""
    if config.rope_scaling:
        raise ValueError(f"{source} uses YaRN rope scaling, which this export does not write yet; export a model without it")
    if config.qk_norm:
        if config.num_shared_experts:
            raise ValueError(f"{source}: Qwen3-MoE has no shared experts, so this model has no GGUF architecture")
        return "qwen3moe" if config.is_moe else "qwen3"
    if config.is_moe:
        raise ValueError(
            f"{source} is a MiniMind2 Mixture-of-Experts model ({config.num_shared_experts} shared experts): llama.cpp's "
            "llama architecture has no shared experts, so only dense MiniMind2 models (and every minimind-3) export to GGUF"
        )
    return "llama"


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered per head from rotate-half pairs (i, i + d/2) to adjacent pairs
    (2i, 2i + 1), the rotation llama.cpp's `llama` applies."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """Our parameters under llama.cpp's tensor names (the tied head is token_embd, written once)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    state = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}
    if config.is_moe:  # one (experts, rows, columns) tensor per projection, as llama.cpp stores them
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp.experts."
            for projection in ("gate_proj", "up_proj", "down_proj"):
                state[f"{prefix}{projection}.weight"] = torch.stack(
                    [state.pop(f"{prefix}{expert}.{projection}.weight") for expert in range(config.num_experts)])
    tensors = {}
    for key, tensor in state.items():
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if key.endswith("q_proj.weight") else config.num_key_value_heads
            tensor = interleave_rope_rows(tensor, heads)
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            raise RuntimeError(f"{key} has no GGUF name in llama.cpp's {arch}")
        tensors[name] = tensor
    return tensors


def encoded(tensor: torch.Tensor, quant: str):
    """(array, raw GGML type or None) for one tensor in the file: 1-D ones in float32, the rest as `quant`."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1 or quant == "f32":
        return array.astype(np.float32), None
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def add_model_fields(writer, config: ModelConfig, quant: str) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.is_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.intermediate_size)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer_fields(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp reads it. Ids past the tokenizer's own (the embedding's spare rows) get
    unused placeholder tokens, so the vocabulary's length is the model's."""
    import gguf

    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size}")
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index in tokenizer.added_tokens_decoder:
        types[index] = gguf.TokenType.CONTROL
    stored_merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in stored_merges]  # tokenizers writes pairs
    writer.add_tokenizer_model("gpt2")
    # GPT-2's split of words, numbers and punctuation is ours; our optional splits of Chinese characters and
    # digits change no token, since no merge was ever learned across them
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(source: str | Path, destination: str | Path, quant: str = "f16") -> Path:
    """Write `destination` (a .gguf file) from a model folder: weights, shape and tokenizer."""
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}; choose one of {QUANTS}")
    source, destination = Path(source), Path(destination)
    model = load_model(source)
    config = model.config
    arch = architecture(config, source)
    tensors = gguf_tensors(model, arch)
    writer = gguf.GGUFWriter(str(destination), arch)
    writer.add_name(source.name)
    add_model_fields(writer, config, quant)
    add_tokenizer_fields(writer, load_tokenizer(source), config.vocab_size)
    for name, tensor in tensors.items():
        array, raw_type = encoded(tensor, quant)
        writer.add_tensor(name, array, raw_dtype=raw_type)
    destination.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination
