"""Losses as pure functions of tensors.

Language-model heads here never materialise the whole (tokens, vocab) logits in fp32: the head and the
softmax run over chunks of rows. At MiniMind's shapes that is both less memory and faster on CPU, where
a 50 MB temporary costs page faults on every step (bench/train.py measures it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(hidden_states: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """Per-token cross-entropy of `targets` under logits `hidden_states @ head_weight.T`.

    hidden_states (..., hidden), targets (...) -> losses (...) in fp32, 0 where the target is IGNORE_INDEX.
    """
    flat_hidden, flat_targets = hidden_states.reshape(-1, hidden_states.shape[-1]), targets.reshape(-1)
    losses = [
        F.cross_entropy(F.linear(hidden, head_weight).float(), target, ignore_index=IGNORE_INDEX, reduction="none")
        for hidden, target in zip(flat_hidden.split(chunk_size), flat_targets.split(chunk_size))
    ]
    return torch.cat(losses).view(targets.shape)


def causal_lm_loss(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1] (labels aligned with the input ids,
    IGNORE_INDEX where no loss is wanted). `weights` (same shape as labels) scales each target token;
    the mean is taken over the weights of the counted tokens."""
    targets = labels[:, 1:]
    losses = token_cross_entropy(hidden_states[:, :-1], head_weight, targets)
    counted = (targets != IGNORE_INDEX).float()
    if weights is not None:
        counted = counted * weights[:, 1:].float()
    return (losses * counted).sum() / counted.sum().clamp(min=1.0)


def sequence_logprobs(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, average: bool = True) -> torch.Tensor:
    """Log-probability of each row's labelled tokens (batch,): their mean (MiniMind's DPO) or sum."""
    targets = labels[:, 1:]
    counted = (targets != IGNORE_INDEX).float()
    total = -(token_cross_entropy(hidden_states[:, :-1], head_weight, targets) * counted).sum(dim=-1)
    return total / counted.sum(dim=-1).clamp(min=1.0) if average else total
