"""Picking the next token: greedy or sampled (temperature, top-k, top-p, repetition penalty), each row of
a batch with its own settings and its own random stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


def suppress(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    return logits.index_fill(-1, torch.as_tensor(token_ids, device=logits.device), float("-inf"))


def pick(sampler: RowSampler, logits: torch.Tensor, seen: torch.Tensor | None, stop_ids: torch.Tensor,
         finished: torch.Tensor, suppress_ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding step after the forward, one for `generate` and the continuous batch alike: a token for
    every row from its last fp32 logits (never a suppressed id; the repetition penalty over `seen`), which
    rows are finished after it (a stop token now, or finished before), and `seen` updated in place with
    the tokens of the rows still going."""
    if suppress_ids:
        logits = suppress(logits, suppress_ids)
    tokens = sampler(logits, seen)
    finished = finished | torch.isin(tokens, stop_ids)
    if seen is not None:
        seen |= torch.zeros_like(seen).scatter_(1, tokens[:, None], ~finished[:, None])
    return tokens, finished
