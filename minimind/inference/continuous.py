"""Continuous batching: rows join a decoding batch between steps and leave it, and the rows already
decoding are never computed again.

A server's batch changes every few steps: replies end at different lengths and new requests arrive.
`ContinuousBatch` keeps one left-padded KV cache for its rows. Newcomers are prefilled together on their
own, and their keys and values are copied into the batch's cache right-aligned with the rows already
there (left padding costs nothing: each row counts its positions from its first real token), so a join
costs the newcomers' prefill, not the whole batch's. Rows that finish leave before the next step.

    batch = ContinuousBatch(model, stop_token_ids=[2])
    first = batch.add(["a", "b"], [[1, 5, 9], [1, 7]], [SamplingParams(32), SamplingParams(8, temperature=0.8)])
    while len(batch):
        for key, token in batch.step(): ...     # token None: that row said a stop token and has left
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import nullcontext

import torch

from minimind.inference.generate import WholeCacheSteps, compiled_step_for, left_pad, one_row_kernels, uses_cuda_graphs
from minimind.inference.sampling import RowSampler, SamplingParams, pick
from minimind.model.model import KVCache


class ContinuousBatch:
    def __init__(self, model, stop_token_ids: Sequence[int], suppress_token_ids: Sequence[int] | None = None):
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device
        self.stop_ids = torch.tensor(list(stop_token_ids), device=self.device)
        self.suppress_ids = list(suppress_token_ids or [])
        self.keys: list[Hashable] = []  # the caller's name for each row, in row order
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator | None] = []
        self.produced: list[int] = []  # tokens each row has sampled
        self.limits: list[int] = []  # the most it may sample (its max_new_tokens, within the context)
        self.cache: KVCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (rows, cached positions): 1 real
        self.last = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # each row's token to feed next
        self.finished = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.done: list[bool] = []  # `finished` on the host
        self.seen: torch.Tensor | None = None  # (rows, vocab) tokens in each row, for repetition penalties
        self.sampler = RowSampler([])
        # one-row steps through the model's compiled step, if it has one (one made for CUDA graphs needs
        # stream_batch's static cache: here it stays eager)
        decode_step = compiled_step_for(model, rows=1) if not uses_cuda_graphs(self.device) else None
        self.compiled_steps = WholeCacheSteps(decode_step) if decode_step is not None else None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def open_rows(self) -> int:
        """Rows still decoding (finished ones are counted by len() until the next step drops them)."""
        return self.done.count(False)

    @torch.inference_mode()
    def add(self, keys: Sequence[Hashable], prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
            generators: Sequence[torch.Generator | None] | None = None, prompt_inputs: dict | None = None) -> list[int | None]:
        """Prefill new rows and join them to the batch; returns each one's first token (None: a stop token).
        `prompt_inputs` are the newcomers' extra forward arguments, such as a VLM's `pixel_values`."""
        context = self.config.max_position_embeddings
        if not prompts or any(not 0 < len(p) < context for p in prompts):
            raise ValueError(f"every prompt needs at least one token and fewer than the {context}-position context")
        generators = list(generators) if generators is not None else [None] * len(prompts)
        ids, mask = left_pad(prompts, self.config.pad_token_id, self.device)
        cache = KVCache(ids.shape[1])
        logits = self.model(ids, mask, kv_cache=cache, logits_to_keep=1, **(prompt_inputs or {})).logits[:, -1].float()
        mask = mask if mask is not None else torch.ones_like(ids)
        limits = [min(p.max_new_tokens, context - len(prompt)) for p, prompt in zip(params, prompts)]
        self._join(cache, mask, ids, keys, params, generators, limits)
        return self._sample(logits, rows=slice(len(self) - len(prompts), len(self)))

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, int | None]]:
        """Drop the finished rows, then decode one token for each row left: (key, token or None)."""
        self._drop(self.finished.nonzero().squeeze(-1).tolist())
        if not len(self):
            return []
        padded = not bool(self.mask.all())
        self.mask = torch.cat([self.mask, torch.ones_like(self.last)], dim=1)
        one_row = self.device.type == "cpu" and len(self) == 1
        mask = self.mask if padded else None
        with one_row_kernels() if one_row else nullcontext():
            if len(self) == 1 and self.compiled_steps is not None:
                logits = self.compiled_steps(self.last, self.cache, mask)
            else:
                logits = self.model(self.last, mask, kv_cache=self.cache, logits_to_keep=1).logits
        logits = logits[:, -1].float()
        return list(zip(self.keys, self._sample(logits, rows=slice(0, len(self)))))

    @torch.inference_mode()
    def finish(self, keys: Sequence[Hashable]) -> None:
        """End these rows now (a server's cancelled or satisfied requests); they leave before the next step."""
        for key in keys:
            row = self.keys.index(key)
            self.finished[row], self.done[row] = True, True

    def _sample(self, logits: torch.Tensor, rows: slice) -> list[int | None]:
        """Tokens for the given rows from their last logits; updates what the next step feeds and who finished."""
        sampler = (
            self.sampler
            if rows == slice(0, len(self))
            else RowSampler(self.params[rows], self.generators[rows], device=self.device)
        )
        seen = self.seen[rows] if self.seen is not None else None
        tokens, stopped = pick(sampler, logits, seen, self.stop_ids, self.finished[rows], self.suppress_ids)
        out = [None if done else token for token, done in zip(tokens.tolist(), stopped.tolist())]
        for row in range(rows.start, rows.stop):
            self.produced[row] += 1
        out_of_tokens = torch.tensor(
            [self.produced[r] >= self.limits[r] for r in range(rows.start, rows.stop)], device=self.device
        )
        self.finished[rows] = stopped | out_of_tokens
        self.done[rows] = self.finished[rows].tolist()
        self.last[rows] = tokens.masked_fill(self.finished[rows], self.config.pad_token_id)[:, None]
        return out

    def _join(self, cache: KVCache, mask: torch.Tensor, ids: torch.Tensor, keys, params, generators, limits) -> None:
        """Copy the newcomers' cache into the batch's, right-aligned: both end at the newest position."""
        old_rows, new_rows = len(self), len(keys)
        old_length = self.cache.length if self.cache is not None else 0
        length = max(old_length, cache.length)
        room = max(list(limits) + [self.limits[r] - self.produced[r] for r in range(old_rows)])
        merged = KVCache(length + room + 1)
        merged.length = length
        for layer in range(len(cache.keys)):
            for buffers, new in ((merged.keys, cache.keys[layer]), (merged.values, cache.values[layer])):
                batch, heads, _, head_dim = new.shape
                buffer = new.new_zeros(old_rows + batch, heads, merged.max_length, head_dim)
                if old_rows:
                    old = (self.cache.keys if buffers is merged.keys else self.cache.values)[layer]
                    buffer[:old_rows, :, length - old_length : length] = old[:, :, :old_length]
                buffer[old_rows:, :, length - cache.length : length] = new[:, :, : cache.length]
                buffers.append(buffer)
        self.cache = merged
        joined_mask = torch.zeros(old_rows + new_rows, length, dtype=torch.long, device=self.device)
        joined_mask[:old_rows, length - old_length :] = self.mask
        joined_mask[old_rows:, length - cache.length :] = mask
        self.mask = joined_mask
        self.keys += list(keys)
        self.params += list(params)
        self.generators += list(generators)
        self.produced += [0] * new_rows
        self.done += [False] * new_rows
        self.limits += limits
        self.last = torch.cat([self.last, torch.zeros(new_rows, 1, dtype=torch.long, device=self.device)])
        self.finished = torch.cat([self.finished, torch.zeros(new_rows, dtype=torch.bool, device=self.device)])
        if self.seen is not None or any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(new_rows, self.config.vocab_size, dtype=torch.bool, device=self.device).scatter_(
                1, ids, mask.bool()
            )
            old_seen = (
                self.seen
                if self.seen is not None
                else torch.zeros(old_rows, self.config.vocab_size, dtype=torch.bool, device=self.device)
            )
            self.seen = torch.cat([old_seen, seen])
        self.sampler = RowSampler(self.params, self.generators, device=self.device)

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        keep = [r for r in range(len(self)) if r not in set(rows)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for attribute in ("keys", "params", "generators", "produced", "limits", "done"):
            setattr(self, attribute, [getattr(self, attribute)[r] for r in keep])
        self.mask, self.last, self.finished = self.mask[index], self.last[index], self.finished[index]
        self.seen = self.seen[index] if self.seen is not None else None
        # positions that are padding in every remaining row need not be attended over any more
        start = int(self.mask.any(dim=0).nonzero()[0]) if keep else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        if self.cache is not None:
            self.cache.keys = [k[index, :, start:] for k in self.cache.keys]
            self.cache.values = [v[index, :, start:] for v in self.cache.values]
            self.cache.length -= start
            self.cache.max_length -= start
        self.sampler = RowSampler(self.params, self.generators, device=self.device)
