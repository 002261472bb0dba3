"""Losses as pure functions of tensors.

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
        F.cross_entropy(_tempered(F.linear(hidden, head_weight).float(), temperature), target, ignore_index=IGNORE_INDEX, reduction="none")
        for hidden, target in zip(flat_hidden.split(chunk_size), flat_targets.split(chunk_size))
    ]
    return torch.cat(losses).view(targets.shape)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be above 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def causal_lm_loss(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
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


def token_logprobs(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token (batch, length - 1) that `labels` (aligned with the input,
    -100 to skip) name, under softmax(logits / temperature); 0 at the skipped ones."""
    return -token_cross_entropy(hidden_states[:, :-1], head_weight, labels[:, 1:], temperature=temperature)


def sequence_logprobs(hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, average: bool = True) -> torch.Tensor:
    """Log-probability of each row's labelled tokens (batch,): their mean (MiniMind's DPO) or sum."""
    total = token_logprobs(hidden_states, head_weight, labels).sum(dim=-1)
    return total / (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1).clamp(min=1) if average else total


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
    beta: float = 0.1, rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), eq. 7:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), on per-sequence log-probs of the replies
    (MiniMind averages them per token). `rpo_alpha` adds that weight times the chosen replies' negative
    log-likelihood (RPO, Pang et al. 2024, arXiv:2404.19733; TRL's `rpo_alpha`): DPO alone may lower the
    chosen reply's probability too, as long as the rejected one falls faster. Returns the mean loss and
    TRL's metric names."""
    rewards_chosen = beta * (policy_chosen - reference_chosen)
    rewards_rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    if rpo_alpha:
        loss = loss - rpo_alpha * policy_chosen.mean()
    metrics = {
        "rewards/chosen": rewards_chosen.mean().detach(),
        "rewards/rejected": rewards_rejected.mean().detach(),
        "rewards/margins": (rewards_chosen - rewards_rejected).mean().detach(),
        "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean(),
        "logps/chosen": policy_chosen.mean().detach(),
        "logps/rejected": policy_rejected.mean().detach(),
    }
    return loss, metrics


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5, temperature: float = 1.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """White-box distillation (Hinton et al. 2015): alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
    both on the supervised next-token positions. The teacher's logits are cut to the student's vocabulary;
    T^2 keeps the soft term's gradient scale independent of T."""
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    targets = labels[:, 1:]
    counted = (targets != IGNORE_INDEX).float()  # weights, not boolean indexing: that would wait for the GPU
    count = counted.sum().clamp(min=1.0)
    student = student_logits[:, :-1].float()
    teacher = teacher_logits[:, :-1, : student.shape[-1]].float()
    ce = (F.cross_entropy(student.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none") * counted).sum() / count
    kl_per_position = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1), log_target=True, reduction="none"
    ).sum(dim=-1)
    kl = (kl_per_position * counted).sum() / count * temperature**2
    return alpha * ce + (1 - alpha) * kl, {"loss/ce": ce.detach(), "loss/kd": kl.detach()}


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, arXiv:2402.03300): each completion's reward standardised
    within the group of completions of its prompt, (r - mean) / (std + eps), rows grouped in order. A
    group whose rewards are all equal has nothing to prefer: its advantages are exactly zero. (Computed
    in float64, and set to zero where a group holds one value: the float mean of eight 0.6 is not 0.6,
    and dividing that rounding by eps gave all eight the same |A| of 6e-4.)"""
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 completions to compare, got {group_size}")
    grouped = rewards.double().view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return advantages.masked_fill(equal, 0.0).float().view(-1)


def policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
    loss_type: str = "grpo", reference_logps: torch.Tensor | None = None, kl_coef: float = 0.0, max_ratio: float = 5.0,
    completions: float | None = None, tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss of GRPO on per-token log-probs (completions, tokens), per token:

        grpo:   -min(r A, clip(r, 1 - eps, 1 + eps) A)       PPO's clipped surrogate, r = pi / pi_old
        cispo:  -sg(min(r, max_ratio)) A log pi               CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4): the
                                                              importance weight is capped and detached, so no
                                                              token loses its gradient (no lower bound: the
                                                              paper sets its eps_low large)
        + kl_coef * (exp(ref - log pi) - (ref - log pi) - 1)  the k3 estimate of KL(pi || ref), as GRPO

    Reduced as each paper does. grpo: averaged over each completion's `mask`ed tokens, summed over
    completions and divided by `completions`. cispo: summed over every masked token and divided by
    `tokens`, the token count of the whole batch, so a long completion's tokens weigh what a short one's
    do (the length bias CISPO removes; TRL: the active tokens of the accumulated batch). When these rows
    are one micro-batch of a larger batch, pass that batch's counts and the micro-batch losses add up to
    its loss; by default these rows are the whole batch. Metrics: the KL (per completion), the share of
    tokens whose ratio was clipped, the mean ratio."""
    ratio = torch.exp(logps - old_logps)
    advantage = advantages[:, None].to(logps.dtype)
    if loss_type == "grpo":
        per_token = -torch.min(ratio * advantage, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage)
        clipped = ((ratio > 1 + clip_eps) & (advantage > 0)) | ((ratio < 1 - clip_eps) & (advantage < 0))
    elif loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=max_ratio).detach() * advantage * logps
        clipped = ratio > max_ratio
    else:
        raise ValueError(f"unknown loss type {loss_type!r}: grpo or cispo")
    kl = torch.zeros_like(logps)
    if reference_logps is not None:
        log_ratio = reference_logps - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
    mask = mask.to(logps.dtype)
    lengths = mask.sum(dim=1).clamp(min=1)
    counted = mask.sum().clamp(min=1)

    def per_completion(values):
        return (values * mask).sum(dim=1) / lengths

    if loss_type == "grpo":
        loss = per_completion(per_token + kl_coef * kl).sum() / (logps.shape[0] if completions is None else completions)
    else:
        loss = ((per_token + kl_coef * kl) * mask).sum() / (counted if tokens is None else tokens)
    metrics = {"grpo/kl": per_completion(kl).mean().detach(), "grpo/clip_fraction": (clipped * mask).sum() / counted,
               "grpo/ratio": ((ratio * mask).sum() / counted).detach()}
    return loss, metrics
