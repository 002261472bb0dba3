"""Decoding: greedy or sampled (temperature, top-k, top-p, repetition penalty), batched with left
padding, streaming, over a preallocated KV cache.

    generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32)        -> [[...], [...]]
    for token in stream_generate(model, [1, 5, 9], temperature=0.7): ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

from minimind.model.model import KVCache, MiniMindForCausalLM
from minimind.model.vision import MiniMindVLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables; > 1 discourages tokens already present
    stop_token_ids: Sequence[int] | None = None  # None: the model's end-of-sequence id
    suppress_token_ids: Sequence[int] | None = None  # never sampled (e.g. a VLM's image placeholder)
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class RowSampler:
    """Picks one token per row, each row with its own sampling parameters and its own random stream.

    A row's token depends only on its logits and its parameters and generator: one uniform number per
    step from the row's generator picks from the inverse CDF of its kept tokens. So a request decoded
    in a batch with any others samples what it would alone (bitwise, given bitwise-equal logits), and
    a server can batch requests whatever their settings. Rows without a generator draw from `shared`
    (or torch's global generator).
    """

    def __init__(self, rows: Sequence[SamplingParams], generators: Sequence[torch.Generator | None] | None = None,
                 shared: torch.Generator | None = None, device="cpu"):
        self.device = torch.device(device)
        column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)[:, None]  # noqa: E731
        self.temperature = column([r.temperature for r in rows], torch.float32)
        self.top_k = column([r.top_k for r in rows], torch.long)
        self.top_p = column([r.top_p for r in rows], torch.float32)
        self.penalty = column([r.repetition_penalty for r in rows], torch.float32)
        self.greedy = not any(r.temperature for r in rows)
        self.penalised = any(r.repetition_penalty != 1.0 for r in rows)
        self.generators = list(generators) if generators is not None else [None] * len(rows)
        self.shared = shared

    def uniforms(self) -> torch.Tensor:
        """One number in [0, 1) per row, each seeded row's from its own generator."""
        if not any(self.generators):
            numbers = torch.rand(len(self.generators), generator=self.shared)
        else:
            numbers = torch.cat([torch.rand(1, generator=g if g is not None else self.shared) for g in self.generators])
        return numbers.to(self.device, non_blocking=True)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits (batch, vocab) -> token ids (batch,)."""
        if seen is not None and self.penalised:
            # CTRL's penalty (Keskar et al. 2019), as in Hugging Face: shrink positive logits, grow negative ones.
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(seen, penalised, logits)
        greedy = logits.argmax(dim=-1)
        if self.greedy:
            return greedy
        uniforms = self.uniforms()[:, None]
        scaled = logits / self.temperature.clamp(min=1e-6)
        probs = scaled.softmax(dim=-1)
        sampled = _inverse_cdf(probs, uniforms)  # rows that keep every token
        truncated = ((self.top_k > 0) | (self.top_p < 1)).squeeze(-1)
        if bool(truncated.any()):
            sampled = torch.where(truncated, self._truncated(scaled, probs, uniforms), sampled)
        return torch.where(self.temperature.squeeze(-1) == 0, greedy, sampled)

    def _truncated(self, scaled: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Sample each row from its top-k, then the smallest prefix of those whose mass reaches its top-p.

        The kept tokens are nearly always among the few most likely, so they are looked for among the
        best CANDIDATES (a cheap topk); only a row whose top-p reaches past them sorts its whole vocabulary."""
        best_logits, best_index = scaled.topk(min(CANDIDATES, scaled.shape[-1]), dim=-1)
        tokens, unsure = _from_sorted(best_logits, best_index, probs.gather(-1, best_index), uniforms, self.top_k, self.top_p)
        if bool(unsure.any()):
            rows = unsure.nonzero().squeeze(-1)
            all_logits, all_index = scaled[rows].sort(dim=-1, descending=True)
            tokens[rows] = _from_sorted(all_logits, all_index, probs[rows].gather(-1, all_index), uniforms[rows],
                                        self.top_k[rows], self.top_p[rows])[0]
        return tokens


def _from_sorted(logits, index, probs, uniforms, top_k, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens from the best `logits` (descending, at vocabulary `index`, `probs` their share of the whole
    softmax) under each row's `top_k` and `top_p` (batch, 1), and which rows' may reach beyond them."""
    count = logits.shape[-1]
    rank = torch.arange(count, device=logits.device)[None, :]
    has_top_k = top_k > 0
    keep = rank < torch.where(has_top_k, top_k, count)
    # after top-k the mass is shared among the k kept; without top-k, among the whole vocabulary
    probs = torch.where(has_top_k, logits.masked_fill(~keep, float("-inf")).softmax(dim=-1), probs)
    keep &= probs.cumsum(dim=-1) - probs < top_p
    mass = probs.sum(dim=-1, keepdim=True)
    unsure = torch.where(has_top_k, top_k > count, (mass < top_p) & (top_p < 1)).squeeze(-1)
    choice = _inverse_cdf(probs.masked_fill(~keep, 0.0), uniforms)
    return index.gather(-1, choice[:, None]).squeeze(-1), unsure


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The index where each row's cumulative `weights` pass `uniforms` (batch, 1) of their total."""
    cdf = weights.cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp(max=weights.shape[-1] - 1).squeeze(-1)


CANDIDATES = 64  # tokens looked at first for top-k/top-p sampling


def next_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator=None) -> torch.Tensor:
    """Pick one token per row from fp32 logits (batch, vocab), every row with the same `params`."""
    if params.suppress_token_ids:
        logits = suppress(logits, params.suppress_token_ids)
    return RowSampler([params] * logits.shape[0], shared=generator, device=logits.device)(logits, seen)


def suppress(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    return logits.index_fill(-1, torch.as_tensor(token_ids, device=logits.device), float("-inf"))


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
    decode_step = getattr(model, "compiled_decode_step", None) if params.use_cache else None
    if decode_step is not None:  # fixed shapes for CUDA graphs: a static cache, and a mask of its full width
        kv_cache = KVCache(_cache_bucket(longest + max_new_tokens, config.max_position_embeddings), static=True)
        kv_cache.positions = torch.arange(longest, device=device)
        full_mask = torch.zeros(len(prompts), kv_cache.max_length, dtype=torch.long, device=device)
        full_mask[:, :longest] = 1 if mask is None else mask
        mask = full_mask

    step_input, sequence = ids, ids
    try:
        for step in range(max_new_tokens):
            extra = (prompt_inputs or {}) if step == 0 or kv_cache is None else {}
            forward = decode_step if decode_step is not None and step > 0 else model
            with one_row_kernels() if device.type == "cpu" and step_input.shape == (1, 1) else nullcontext():
                logits = forward(step_input, mask, kv_cache=kv_cache, logits_to_keep=1, **extra).logits[:, -1].float()
            if params.suppress_token_ids:
                logits = suppress(logits, params.suppress_token_ids)
            token = sampler(logits, seen)
            finished |= torch.isin(token, stop_ids_tensor)
            yield [None if done else t for t, done in zip(token.tolist(), finished.tolist())]
            if bool(finished.all()):
                return
            token = token.masked_fill(finished, config.pad_token_id)[:, None]
            if seen is not None:
                seen.scatter_(1, token, ~finished[:, None])
            if decode_step is not None:
                mask[:, longest + step] = 1
                kv_cache.positions = kv_cache.positions[-1:] + 1
            elif mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            sequence = torch.cat([sequence, token], dim=1)
            step_input = token if kv_cache is not None else sequence
    finally:
        model.train(was_training)


def compile_for_decoding(model) -> None:
    """`--compile`. On CUDA the one-token decoding step is compiled for CUDA graphs (mode="reduce-overhead")
    over a static KV cache: one graph replay per token instead of a few hundred kernel launches; the
    prefill stays eager. On CPU inductor compiles the whole forward with the weights frozen (constant-
    folded and pre-packed for its matmuls)."""
    if next(model.parameters()).is_cuda:
        model.compiled_decode_step = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    else:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        model.forward = torch.compile(model.forward, dynamic=True)


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


def generate_with_images(vlm: MiniMindVLM, prompts: list[list[int]], images: list[Image.Image], **sampling) -> list[list[int]]:
    """Batched, KV-cached generation; `images` are every prompt's images, prompt by prompt, in order."""
    pixel_values = vlm.pixel_values(images) if images else None
    return generate(vlm, prompts, prompt_inputs={"pixel_values": pixel_values}, suppress_token_ids=[vlm.image_token_id], **sampling)
