"""The losses of the preference and distillation stages, as pure functions of tensors: DPO (with RPO's
NLL term) on sequence log-probabilities, and white-box KD on the teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimind.model.losses import IGNORE_INDEX


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
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.5,
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
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(dim=-1)
    kl = (kl_per_position * counted).sum() / count * temperature**2
    return alpha * ce + (1 - alpha) * kl, {"loss/ce": ce.detach(), "loss/kd": kl.detach()}
