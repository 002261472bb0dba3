"""The language model's losses and log-probabilities, as pure functions of tensors (the stages' own
losses build on these: minimind.training.losses, minimind.rl.losses).

Language-model heads here never materialise the whole (tokens, vocab) logits in fp32: the head and the
softmax run over chunks of rows. At MiniMind's shapes that is both less memory and faster on CPU, where
a 50 MB temporary costs page faults on every step (bench/train.py measures it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(hidden_states: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 512,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token cross-entropy of `targets` under logits `hidden_states @ head_weight.T`, divided by
    `temperature` (in fp32) when it is not 1: the distribution softmax(logits / T) that sampling at T draws from.

    hidden_states (..., hidden), targets (...) -> losses (...) in fp32, 0 where the target is IGNORE_INDEX.
    """
    flat_hidden, flat_targets = hidden_states.reshape(-1, hidden_states.shape[-1]), targets.reshape(-1)
    losses = [
        F.cross_entropy(
            _tempered(F.linear(hidden, head_weight).float(), temperature), target, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for hidden, target in zip(flat_hidden.split(chunk_size), flat_targets.split(chunk_size))
    ]
    return torch.cat(losses).view(targets.shape)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be above 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def causal_lm_loss(
    hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1] (labels aligned with the input ids,
    IGNORE_INDEX where no loss is wanted).

    `weights` (same shape as labels) scale each target token's loss, and the sum is divided by the number
    of supervised tokens, not by the sum of the weights: MiniMind's reasoning loss
    (`loss_mask[special_ids] = 10`, divided by the mask's sum taken before the x10). So a weight of 10
    on a tag adds ten tokens' worth of loss on top, and the plain tokens keep their full 1/N share
    however many tags a row holds; with all weights 1 this is the plain mean.
    """
    targets = labels[:, 1:]
    losses = token_cross_entropy(hidden_states[:, :-1], head_weight, targets)
    counted = (targets != IGNORE_INDEX).float()
    scale = counted if weights is None else counted * weights[:, 1:].float()
    return (losses * scale).sum() / counted.sum().clamp(min=1.0)


def token_logprobs(
    hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each next token (batch, length - 1) that `labels` (aligned with the input,
    -100 to skip) name, under softmax(logits / temperature); 0 at the skipped ones."""
    return -token_cross_entropy(hidden_states[:, :-1], head_weight, labels[:, 1:], temperature=temperature)


def sequence_logprobs(
    hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, average: bool = True
) -> torch.Tensor:
    """Log-probability of each row's labelled tokens (batch,): their mean (MiniMind's DPO) or sum."""
    total = token_logprobs(hidden_states, head_weight, labels).sum(dim=-1)
    return total / (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1).clamp(min=1) if average else total
