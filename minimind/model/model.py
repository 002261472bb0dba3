"""MiniMind: a small decoder-only Transformer (the MiniMind2 architecture), readable top to bottom.

- pre-norm blocks with RMSNorm;
- rotary position embeddings precomputed in fp32, optional YaRN scaling for longer contexts;
- grouped-query attention through `scaled_dot_product_attention` (flash or memory-efficient kernels on CUDA),
  causal plus an optional padding mask;
- SwiGLU feed-forward, or a Mixture-of-Experts FFN (softmax router, top-k, shared experts, aux loss);
- token embedding tied with the output head;
- a preallocated KV cache for inference.

Parameter names follow Hugging Face's Llama, so a dense checkpoint exports without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimind.model.config import ModelConfig
from minimind.model.losses import causal_lm_loss


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections compute in: autocast's when it is on, else the activations' own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast (squares of bf16 activations lose too much precision),
        # then hand the projections that follow the autocast dtype: one cast here, not one per matmul.
        dtype = compute_dtype(x)
        if x.dtype == self.weight.dtype == dtype:  # bf16 inference weights: the fused kernel already sums in fp32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(dtype)


# --------------------------------------------------------------------------- rotary embeddings


def rope_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds, and the factor YaRN multiplies cos/sin by (1.0 without scaling)."""
    dim, base = config.head_dim, config.rope_theta
    # fp32 throughout, exactly as Llama computes it, so exported models match position for position.
    wavelength_base = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / wavelength_base
    if not config.rope_scaling:
        return inv_freq, 1.0
    # YaRN (Peng et al. 2023, arXiv:2309.00071): interpolate the slow pairs by `factor`, keep the fast
    # pairs as trained, blend linearly in between; the same formula as Hugging Face's "yarn" rope type.
    scaling = config.rope_scaling
    factor = float(scaling["factor"])
    original_max = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def pair_index_with_rotations(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index_with_rotations(beta_fast)), 0)
    high = min(math.ceil(pair_index_with_rotations(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    extrapolated = 1 - ramp
    inv_freq = 1.0 / (factor * wavelength_base) * (1 - extrapolated) + inv_freq * extrapolated
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_factor


def precompute_rope(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_position_embeddings, head_dim), halves duplicated (Llama layout)."""
    inv_freq, attention_factor = rope_inverse_frequencies(config)
    angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------- KV cache and masks


class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    Decoding writes each new position in place; nothing is re-concatenated. Buffers are allocated on
    the first write, with the batch size, dtype and device of the keys the model produces.

    `static=True` keeps every shape fixed, for compiled decoding steps (and CUDA graphs): each forward
    attends over all `max_length` positions under an attention mask of that width (0 where nothing is
    written yet) and writes at `positions`, a tensor the caller sets, so one compiled step serves every
    position.
    """

    def __init__(self, max_length: int, static: bool = False):
        self.max_length = max_length
        self.length = 0  # positions filled in every layer (not kept when static: the caller knows)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.static = static
        self.positions: torch.Tensor | None = None  # static: the positions the next forward writes

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            batch, heads, _, head_dim = keys.shape
            self.keys.append(keys.new_zeros(batch, heads, self.max_length, head_dim))
            self.values.append(values.new_zeros(batch, heads, self.max_length, head_dim))
            if self.static:  # CUDA graphs may then write these buffers in place
                torch._dynamo.mark_static_address(self.keys[layer])
                torch._dynamo.mark_static_address(self.values[layer])
        if self.static:
            self.keys[layer].index_copy_(2, self.positions, keys)
            self.values[layer].index_copy_(2, self.positions, values)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions, asked to fill up to {end}")
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def attention_mask_for(attention_mask: torch.Tensor | None, query_positions: torch.Tensor, key_len: int) -> torch.Tensor | None:
    """`allowed` (batch, query, key) for `grouped_query_attention`, or None without an attention mask.

    `attention_mask` is (batch, at least key_len) with 1 for real tokens and 0 for padding; the queries
    sit at `query_positions`. Query i may see key j when j <= i and j is real; a padding query may see
    itself so its softmax stays finite (its output is never read).
    """
    if attention_mask is None:
        return None
    key_positions = torch.arange(key_len, device=attention_mask.device)
    causal = key_positions[None, :] <= query_positions[:, None]
    allowed = causal & attention_mask[:, None, :key_len].bool()
    return allowed | (key_positions[None, :] == query_positions[:, None])


# "auto": SDPA's fused kernels on CUDA and for one-token decoding on CPU, `_matmul_attention` for CPU training
# and prefill (each the faster there, measured by bench/train.py and bench/generate.py); "sdpa": SDPA on
# every device and shape (a switch for tests and benchmarks: on CPU it checks that both paths agree).
ATTENTION_KERNEL = "auto"


def grouped_query_attention(q, k, v, allowed: torch.Tensor | None, is_causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d over the allowed keys) v, each K/V head shared by a group of query heads (GQA).

    q is (batch, heads, queries, head_dim); k and v are (batch, kv_heads, keys, head_dim); `allowed` is
    None or (batch or 1, queries, keys). Neither path copies K/V per query head.
    """
    if q.is_cuda or ATTENTION_KERNEL == "sdpa" or q.shape[2] == 1:
        return _sdpa_attention(q, k, v, allowed, is_causal, dropout_p)
    return _matmul_attention(q, k, v, allowed, is_causal, dropout_p)


def _stack_query_groups(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, heads, queries, d) -> (batch, kv_heads, groups * queries, d): the query heads sharing a K/V
    head become more queries of that head (query head h uses K/V head h // groups)."""
    batch, heads, queries, head_dim = q.shape
    return q.reshape(batch, kv_heads, heads // kv_heads * queries, head_dim)


def _sdpa_attention(q, k, v, allowed, is_causal, dropout_p):
    batch, heads, queries, head_dim = q.shape
    if allowed is None:  # causal or unmasked (training's right-padded rows, cached decoding): flash takes GQA itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=True)
    # With a mask, flash is out and the memory-efficient kernel takes no `enable_gqa` (it would fall back to
    # the math kernel); stacking each group's queries under its K/V head keeps the efficient kernel, with
    # the mask repeated per group, and K/V uncopied.
    groups = heads // k.shape[1]
    mask = allowed.repeat(1, groups, 1).unsqueeze(1)  # (batch or 1, 1, groups * queries, keys)
    out = F.scaled_dot_product_attention(_stack_query_groups(q, k.shape[1]), k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.view(batch, heads, queries, head_dim)


def _matmul_attention(q, k, v, allowed, is_causal, dropout_p):
    """Two batched matmuls over the stacked query groups: on CPU faster than SDPA's kernel at training
    shapes in bf16 (measured by bench/train.py)."""
    batch, heads, queries, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q = _stack_query_groups(q, kv_heads).reshape(batch * kv_heads, groups * queries, head_dim)
    k = k.reshape(batch * kv_heads, keys, head_dim)
    v = v.reshape(batch * kv_heads, keys, head_dim)
    if is_causal:
        allowed = torch.ones(1, queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
    if allowed is None:
        scores = torch.bmm(q, k.transpose(1, 2)) * head_dim**-0.5
    else:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = bias.repeat_interleave(kv_heads if bias.shape[0] > 1 else 1, dim=0).repeat(1, groups, 1)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=head_dim**-0.5)  # mask added inside the matmul
    probs = F.dropout(scores.softmax(dim=-1), dropout_p, training=dropout_p > 0)
    return torch.bmm(probs, v).view(batch, heads, queries, head_dim)


def position_ids_for(attention_mask: torch.Tensor | None, query_positions: torch.Tensor) -> torch.Tensor:
    """Each row counts positions from its first real token, so left padding does not shift RoPE."""
    if attention_mask is None:
        return query_positions[None, :]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, query_positions]


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # minimind-3 / Qwen3: each head's q and k normalised before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, kv_cache: KVCache | None, layer: int):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        y = grouped_query_attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts: a softmax router sends each token to its top-k routed experts;
    shared experts see every token. Returns (output, load-balancing loss)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.num_experts, self.aux_loss_alpha = config.num_experts_per_tok, config.num_experts, config.aux_loss_alpha
        self.normalise = config.renormalises_top_k  # MiniMind2: only top-k > 1; minimind-3 (Qwen3-MoE): always
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.num_shared_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        probs = self.gate(tokens).float().softmax(dim=-1)  # (tokens, experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (tokens, k)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # Sort the tokens x k assignments by expert so every expert runs one matmul on a contiguous slice.
        flat_expert = chosen.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_index = order // self.top_k
        counts = flat_expert.bincount(minlength=self.num_experts).tolist()
        routed_inputs = tokens[token_index].split(counts)
        # An idle expert still runs, on no tokens: its gradient is a zero, so DDP needs no find_unused_parameters.
        # (The counts are read on the host to split the tokens: MoE's one host synchronisation per layer.)
        routed_outputs = torch.cat([expert(part) for expert, part in zip(self.experts, routed_inputs)])
        routed_outputs = routed_outputs * weights.reshape(-1)[order, None].to(routed_outputs.dtype)
        output = routed_outputs.new_zeros(tokens.shape).index_add_(0, token_index, routed_outputs)
        for shared in self.shared_experts:
            output = output + shared(tokens)
        return output.view(x.shape), self.load_balancing_loss(probs, flat_expert)

    def load_balancing_loss(self, probs: torch.Tensor, flat_expert: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's loss (Fedus et al. 2021, eq. 4): alpha * E * sum_i f_i * P_i, where f_i is
        the fraction of assignments routed to expert i and P_i its mean router probability. It equals
        alpha when routing is uniform and grows as routing collapses; gradients reach the router via P."""
        assigned_fraction = flat_expert.bincount(minlength=self.num_experts).float() / flat_expert.numel()
        return self.aux_loss_alpha * self.num_experts * (assigned_fraction * probs.mean(dim=0)).sum()


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.is_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache, self.layer)
        ffn_out = self.mlp(self.post_attention_layernorm(x))
        aux_loss = None
        if isinstance(ffn_out, tuple):
            ffn_out, aux_loss = ffn_out
        return x + ffn_out, aux_loss


# --------------------------------------------------------------------------- the model


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (batch, positions kept, vocab); None when labels were given
    aux_loss: torch.Tensor  # MoE load-balancing loss summed over layers; 0 for dense models
    hidden_states: torch.Tensor  # final normalised hidden states (batch, length, hidden)
    loss: torch.Tensor | None = None  # next-token cross-entropy + aux_loss, when labels were given


class MiniMindModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, layer) for layer in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.config = config
        cos, sin = precompute_rope(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:  # model.to(bf16) must not round the RoPE tables
            self.rope_cos, self.rope_sin = (table.to(self.rope_cos.device) for table in precompute_rope(self.config))
        return self


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.num_hidden_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """`attention_mask` (batch, past + new) marks real tokens with 1; with a `kv_cache` it covers the
        cached positions too. `logits_to_keep` > 0 computes logits for the last positions only.
        `labels` (aligned with input_ids, -100 to skip) gives `.loss` without materialising the logits,
        optionally weighted per target token by `loss_weights`;
        `return_logits=False` skips the head for callers that only need the hidden states."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = x.shape[1]
        if kv_cache is not None and kv_cache.static:  # shapes fixed for compiled steps (see KVCache)
            query_positions, key_len = kv_cache.positions, attention_mask.shape[1]  # the mask spans the whole cache
        else:
            past_len = kv_cache.length if kv_cache is not None else 0
            query_positions, key_len = torch.arange(past_len, past_len + length, device=x.device), past_len + length
        if position_ids is None:
            position_ids = position_ids_for(attention_mask, query_positions)
        # (batch or 1, 1, length, head_dim): the tables stay fp32, the rotation runs in the projections' dtype
        cos = self.model.rope_cos[position_ids].unsqueeze(1).to(compute_dtype(x))
        sin = self.model.rope_sin[position_ids].unsqueeze(1).to(compute_dtype(x))
        mask = attention_mask_for(attention_mask, query_positions, key_len)
        is_causal = mask is None and key_len == length > 1  # no padding, no cache: the plain causal mask

        x = self.model.dropout(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for block in self.model.layers:
            x, block_aux = block(x, cos, sin, mask, is_causal, kv_cache)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
        if kv_cache is not None and not kv_cache.static:
            kv_cache.length += length
        hidden_states = self.model.norm(x)
        if labels is not None:
            loss = causal_lm_loss(hidden_states, self.lm_head.weight, labels, loss_weights) + aux_loss
            return CausalLMOutput(logits=None, aux_loss=aux_loss, hidden_states=hidden_states, loss=loss)
        logits = None
        if return_logits:
            logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        return CausalLMOutput(logits=logits, aux_loss=aux_loss, hidden_states=hidden_states)

    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters (the tied head counted once); `active` counts only top-k routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.config.is_moe:
            per_expert = sum(p.numel() for p in self.model.layers[0].mlp.experts[0].parameters())
            idle_experts = self.config.num_experts - self.config.num_experts_per_tok
            total -= idle_experts * per_expert * self.config.num_hidden_layers
        return total


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's wrapper (`.module`) and torch.compile's (`._orig_mod`)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
