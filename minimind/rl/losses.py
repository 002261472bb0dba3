"""GRPO's losses as pure functions of tensors: advantages within each prompt's group of completions, and
the clipped (GRPO) or capped-weight (CISPO) policy-gradient loss with an optional KL term."""

from __future__ import annotations

import torch


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
