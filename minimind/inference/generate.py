"""Decoding, batched with left padding, streaming, over a preallocated KV cache (minimind.inference.sampling
picks each token).

    generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32)        -> [[...], [...]]
    for token in stream_generate(model, [1, 5, 9], temperature=0.7): ...
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from minimind.inference.sampling import RowSampler, SamplingParams, pick
from minimind.model.model import KVCache, MiniMindForCausalLM


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch, longest) ids and attention mask; the mask is None when no row needs padding."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.as_tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


@torch.inference_mode()
def stream_batch(model: MiniMindForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 prompt_inputs: dict | None = None) -> Iterator[list[int | None]]:
    """Yield, each step, one new token per prompt, or None for a prompt that has finished.

    A prompt finishes when it samples a stop token (which is not yielded); the stream ends when all
    have finished or after `max_new_tokens` steps. A seed seeds the batch's one random stream.
    `prompt_inputs` are extra forward arguments that belong to the prompt tokens, such as a VLM's
    `pixel_values`: given at prefill (and at every step without a KV cache, which recomputes the
    prompt). A server whose rows come and go uses `minimind.inference.continuous.ContinuousBatch` instead.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = model.config
    longest = max(len(p) for p in prompts)
    if longest >= config.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens leaves no room in the {config.max_position_embeddings}-position context")
    max_new_tokens = min(params.max_new_tokens, config.max_position_embeddings - longest)
    stop_ids = list(params.stop_token_ids if params.stop_token_ids is not None else [config.eos_token_id])
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, config.pad_token_id, device)
    stop_ids_tensor = torch.tensor(stop_ids, device=device)
    shared = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    sampler = RowSampler([params] * len(prompts), shared=shared, device=device)
    seen = None
    if sampler.penalised:
        seen = torch.zeros(len(prompts), config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool))
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    kv_cache = KVCache(longest + max_new_tokens) if params.use_cache else None
    decode_step = compiled_step_for(model, rows=len(prompts)) if params.use_cache else None
    cuda_graphs = decode_step is not None and uses_cuda_graphs(device)
    whole_cache_steps = WholeCacheSteps(decode_step) if decode_step is not None and not cuda_graphs else None
    if cuda_graphs:  # fixed shapes for CUDA graphs: a static cache, and a mask of its full width
        kv_cache = KVCache(_cache_bucket(longest + max_new_tokens, config.max_position_embeddings), static=True)
        kv_cache.positions = torch.arange(longest, device=device)
        full_mask = torch.zeros(len(prompts), kv_cache.max_length, dtype=torch.long, device=device)
        full_mask[:, :longest] = 1 if mask is None else mask
        mask = full_mask

    step_input, sequence = ids, ids
    try:
        for step in range(max_new_tokens):
            extra = (prompt_inputs or {}) if step == 0 or kv_cache is None else {}
            with one_row_kernels() if device.type == "cpu" and step_input.shape == (1, 1) else nullcontext():
                if step > 0 and whole_cache_steps is not None:
                    logits = whole_cache_steps(step_input, kv_cache, mask)
                else:
                    forward = decode_step if cuda_graphs and step > 0 else model
                    logits = forward(step_input, mask, kv_cache=kv_cache, logits_to_keep=1, **extra).logits
            logits = logits[:, -1].float()
            token, finished = pick(sampler, logits, seen, stop_ids_tensor, finished, params.suppress_token_ids)
            yield [None if done else t for t, done in zip(token.tolist(), finished.tolist())]
            if bool(finished.all()):
                return
            token = token.masked_fill(finished, config.pad_token_id)[:, None]
            if cuda_graphs:
                mask[:, longest + step] = 1
                kv_cache.positions = kv_cache.positions[-1:] + 1
            elif mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            if kv_cache is None:  # without a cache every step recomputes the whole sequence
                sequence = torch.cat([sequence, token], dim=1)
            step_input = token if kv_cache is not None else sequence
    finally:
        model.train(was_training)


def compile_for_decoding(model) -> bool:
    """Compile the model's one-token decoding step (`minimind chat` and Serve do by default on a CPU, see
    `wants_compile`); returns whether it did. The prefill stays eager.

    On CPU the step of one row is compiled by inductor, its one-row products rewritten as multiply-and-sum
    reductions (inductor's `decompose_mm_pass`, here extended to the output head): aten's one-row product
    runs on one core, which cannot draw the machine's memory bandwidth alone, while inductor's reductions
    spread over every core, fused with the norms, RoPE and residual adds around them. Steps run over the
    whole cache (`WholeCacheSteps`) with its length a dynamic dimension: one graph for every position
    and prompt length, compiled once per process (and read back from inductor's on-disk cache later). Batched
    steps stay eager on CPU (oneDNN's products are fast from a few rows on), and so do MoE models.

    On CUDA the step of any batch is compiled for CUDA graphs (mode="reduce-overhead") over a static KV
    cache: one graph replay per token instead of a few hundred kernel launches.
    """
    if next(model.parameters()).is_cuda:
        model.compiled_decode_step = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
        return True
    if model.config.is_moe:  # routing reads each expert's token count on the host: a graph break per layer
        return False
    if not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        warnings.warn("no C++ compiler found (inductor needs one on CPU): decoding stays eager", stacklevel=2)
        return False
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    # the pass reads its size limits when imported; by default it leaves products wider than 2048 (the head) alone
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = 1 << 30
    options = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "size_asserts": False}  # ~100 asserts a step
    model.compiled_decode_step = torch.compile(model.forward, options=options)
    return True


def uses_cuda_graphs(device: torch.device) -> bool:
    """Whether `compile_for_decoding` compiled for CUDA graphs on this device (tests run that path on CPU)."""
    return device.type == "cuda"


def wants_compile(choice: str, device) -> bool:
    """`--compile auto|on|off`: auto compiles the decoding step on a CPU (faster from the first reply on, after
    a one-off compile) and leaves a GPU eager."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {choice!r}")
    return choice == "on" or (choice == "auto" and torch.device(device).type == "cpu")


def compiled_step_for(model, rows: int):
    """The model's compiled decoding step if it has one for batches of `rows` (on CPU: one row only)."""
    decode_step = getattr(model, "compiled_decode_step", None)
    if decode_step is None or (rows > 1 and not uses_cuda_graphs(next(model.parameters()).device)):
        return None
    return decode_step


class WholeCacheSteps:
    """Decoding steps of a compiled forward (`decode_step`) over a growing KV cache, each returning its logits.

    Each step attends over the cache's buffers whole, under a mask of their width (1 up to the new position),
    and writes the new position in place through a static view of the cache (see KVCache). The buffers' length
    is marked dynamic, so no cache size or position recompiles. The view and the full-width mask are kept from
    step to step and rebuilt only when the cache's buffers change (a continuous batch's rows came or went).
    """

    def __init__(self, decode_step):
        self.decode_step = decode_step
        self.view: KVCache | None = None  # shares the cache's lists of buffers (a new list: new buffers)
        self.full_mask: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, cache: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        """`mask` is None (no padding) or (rows, cached + 1) with 1 for real tokens."""
        if self.view is None or self.view.keys is not cache.keys:
            self._rebuild(cache, mask)
        elif mask is None:
            self.full_mask[:, cache.length] = 1
        else:
            self.full_mask[:, : mask.shape[1]] = mask
        self.view.positions.fill_(cache.length)
        logits = self.decode_step(tokens, self.full_mask, kv_cache=self.view, logits_to_keep=1).logits
        cache.length += 1
        return logits

    def _rebuild(self, cache: KVCache, mask: torch.Tensor | None) -> None:
        device = cache.keys[0].device
        self.full_mask = torch.zeros(cache.keys[0].shape[0], cache.max_length, dtype=torch.long, device=device)
        self.full_mask[:, : cache.length + 1] = 1 if mask is None else mask
        self.view = KVCache(cache.max_length, static=True)
        self.view.keys, self.view.values = cache.keys, cache.values
        self.view.positions = torch.tensor([cache.length], device=device)
        for buffer in cache.keys + cache.values:
            torch._dynamo.maybe_mark_dynamic(buffer, 2)
        torch._dynamo.maybe_mark_dynamic(self.full_mask, 1)


def _cache_bucket(length: int, context: int) -> int:
    """A static cache's length: the next power of two (at least 64, at most the context), so one compiled
    graph serves every request up to it."""
    return min(context, max(64, 1 << (length - 1).bit_length()))


def inference_dtype(name: str, device) -> torch.dtype:
    """The dtype to keep inference weights in: bf16 (half the bytes read per decoded token, and no casts
    under autocast) wherever the device computes in it, else fp32."""
    if name == "bf16" and (torch.device(device).type == "cpu" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


@contextmanager
def one_row_kernels():
    """torch's own CPU kernels instead of oneDNN's for matmuls of one row (decoding one sequence): oneDNN,
    torch's default for bf16, spends ~10 µs setting up each call, up to half the time of a one-row product,
    while torch's GEMV reads the weights at full speed (about 1.4x faster decoding here, bench/generate.py).
    From a few rows on oneDNN is far faster, so this is for batch-1 decoding steps only."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def generate(model: MiniMindForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
             prompt_inputs: dict | None = None, **sampling) -> list[list[int]]:
    """New token ids for each prompt (stop token excluded). Keyword arguments are SamplingParams fields."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_batch(model, prompts, params or SamplingParams(**sampling), prompt_inputs):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs


def generate_tensors(model: MiniMindForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     do_sample: bool | None = None, **sampling) -> torch.Tensor:
    """`generate` as `transformers` takes and returns it: an `input_ids` tensor (with its
    `attention_mask`, padding on either side) in, each row's input followed by its new ids out,
    right-padded with the pad id; `do_sample=False` means greedy."""
    if do_sample is False:
        sampling["temperature"] = 0.0
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    new = generate(model, [row[keep].tolist() for row, keep in zip(input_ids, real)], **sampling)
    out = input_ids.new_full((input_ids.shape[0], input_ids.shape[1] + max(map(len, new), default=0)), model.config.pad_token_id)
    out[:, : input_ids.shape[1]] = input_ids
    for row, tokens in enumerate(new):
        out[row, input_ids.shape[1] : input_ids.shape[1] + len(tokens)] = torch.as_tensor(tokens, dtype=input_ids.dtype)
    return out


def stream_generate(model: MiniMindForCausalLM, prompt: Sequence[int], params: SamplingParams | None = None,
                    prompt_inputs: dict | None = None, **sampling) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced."""
    for (token,) in stream_batch(model, [prompt], params or SamplingParams(**sampling), prompt_inputs):
        if token is None:
            return
        yield token
