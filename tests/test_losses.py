import math

import pytest
import torch
import torch.nn.functional as F

from minimind.model.losses import IGNORE_INDEX, causal_lm_loss, sequence_logprobs, token_cross_entropy
from minimind.training.losses import dpo_loss, kd_loss


def test_chunked_token_cross_entropy_equals_the_full_computation():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 700, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (3, 700))
    targets[0, :5] = IGNORE_INDEX
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(token_cross_entropy(hidden, weight, targets, chunk_size=128), expected.view(3, 700))


def test_weighted_lm_loss_divides_by_the_supervised_token_count_as_minimind_does():
    torch.manual_seed(0)
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 4]])
    weights = torch.tensor([[1.0, 10.0, 1.0, 1.0]])
    per_token = token_cross_entropy(hidden[:, :-1], weight, labels[:, 1:])[0]
    expected = (10 * per_token[0] + per_token[2]) / 2  # two supervised targets; the ignored one counts in neither
    torch.testing.assert_close(causal_lm_loss(hidden, weight, labels, weights), expected)
    assert causal_lm_loss(hidden, weight, torch.full_like(labels, IGNORE_INDEX)) == 0  # nothing supervised


@pytest.mark.parametrize("seed", range(5))
def test_tag_weight_never_dilutes_the_plain_tokens_share(seed):
    """Property: each plain token's loss enters with weight 1/N (N supervised tokens), whatever the tag
    weight and however many tags the row holds; all-ones weights give the unweighted mean; weight 0 on
    the tags is the mean over N with the tags left out of the sum."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 12, 8, generator=generator)
    head = torch.randn(20, 8, generator=generator)
    labels = torch.randint(0, 20, (2, 12), generator=generator)
    labels[:, :3] = IGNORE_INDEX
    is_tag = torch.rand(2, 12, generator=generator) < 0.5
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())

    unweighted = causal_lm_loss(hidden, head, labels)
    torch.testing.assert_close(causal_lm_loss(hidden, head, labels, torch.ones_like(labels, dtype=torch.float)), unweighted)
    losses = token_cross_entropy(hidden[:, :-1], head, labels[:, 1:])
    plain = (~is_tag[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX)
    tags = is_tag[:, 1:] & (labels[:, 1:] != IGNORE_INDEX)
    for tag_weight in (0.0, 1.0, 10.0, 100.0):
        weights = torch.where(is_tag, tag_weight, 1.0)
        expected = (losses[plain].sum() + tag_weight * losses[tags].sum()) / supervised
        torch.testing.assert_close(causal_lm_loss(hidden, head, labels, weights), expected)


def test_sequence_logprobs_mean_and_sum():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(10, 8)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX]])
    logps = (hidden[:, :-1] @ weight.T).log_softmax(-1)
    row0 = logps[0, 1, 3] + logps[0, 2, 4] + logps[0, 3, 5]
    torch.testing.assert_close(sequence_logprobs(hidden, weight, labels, average=False)[0], row0)
    torch.testing.assert_close(sequence_logprobs(hidden, weight, labels)[0], row0 / 3)


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -1.5])
    loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["rewards/margins"] == 0 and metrics["rewards/accuracies"] == 0


def test_dpo_loss_rewards_preferring_the_chosen_reply():
    reference = torch.tensor([-2.0])
    better, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), reference, reference)
    worse, metrics = dpo_loss(torch.tensor([-3.0]), torch.tensor([-1.0]), reference, reference)
    assert better < math.log(2) < worse
    assert metrics["rewards/accuracies"] == 0 and metrics["rewards/margins"].item() == pytest.approx(-0.2)
    expected = -F.logsigmoid(torch.tensor(0.1 * ((-1.0 + 2.0) - (-3.0 + 2.0))))
    torch.testing.assert_close(better, expected)


def test_dpo_beta_edges():
    chosen, rejected, reference = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0])
    assert dpo_loss(chosen, rejected, reference, reference, beta=0.0)[0].item() == pytest.approx(math.log(2))  # no signal
    assert dpo_loss(chosen, rejected, reference, reference, beta=100.0)[0].item() < 1e-6  # saturates when right
    assert dpo_loss(rejected, chosen, reference, reference, beta=100.0)[0].item() == pytest.approx(
        200.0, rel=1e-3
    )  # linear when wrong


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def kd_inputs(seed=0, vocab=12):
    torch.manual_seed(seed)
    labels = torch.randint(0, vocab, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    return torch.randn(2, 6, vocab), torch.randn(2, 6, vocab + 4), labels


def test_kd_term_vanishes_when_student_equals_teacher():
    student, _, labels = kd_inputs()
    teacher = torch.cat([student, torch.randn(2, 6, 4)], dim=-1)  # extra teacher vocabulary is cut off
    loss, metrics = kd_loss(student, teacher, labels, alpha=0.0)
    assert metrics["loss/kd"].abs() < 1e-6 and loss.abs() < 1e-6


def test_kd_with_no_supervised_position_is_a_zero_that_still_backpropagates():
    student, teacher, labels = kd_inputs()
    student.requires_grad_(True)
    loss, metrics = kd_loss(student, teacher, torch.full_like(labels, IGNORE_INDEX))
    loss.backward()
    assert loss == 0 and metrics["loss/ce"] == 0 and student.grad.abs().sum() == 0


def test_kd_alpha_one_is_plain_cross_entropy_and_mixes_linearly():
    student, teacher, labels = kd_inputs()
    ce = F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    full_ce, metrics = kd_loss(student, teacher, labels, alpha=1.0)
    torch.testing.assert_close(full_ce, ce)
    mixed, _ = kd_loss(student, teacher, labels, alpha=0.3, temperature=2.0)
    _, metrics = kd_loss(student, teacher, labels, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(mixed, 0.3 * metrics["loss/ce"] + 0.7 * metrics["loss/kd"])
    assert metrics["loss/kd"] > 0


def test_kd_only_counts_supervised_positions():
    student, teacher, labels = kd_inputs()
    changed = teacher.clone()
    changed[:, 0] += 100.0  # position 0 predicts label 1, which is ignored
    assert torch.equal(kd_loss(student, teacher, labels)[0], kd_loss(student, changed, labels)[0])
    changed[:, 3] += 5 * torch.randn(changed.shape[-1])
    assert not torch.equal(kd_loss(student, teacher, labels)[0], kd_loss(student, changed, labels)[0])


def test_kd_temperature_edges():
    student, teacher, labels = kd_inputs()
    with pytest.raises(ValueError):
        kd_loss(student, teacher, labels, temperature=0.0)
    # Softmax sees logits / T only, so scaling logits and T by c leaves the KL alone: the T^2 factor then
    # scales the term by c^2, which is what keeps gradient magnitudes comparable across temperatures.
    base = kd_loss(student, teacher, labels, alpha=0.0, temperature=1.5)[1]["loss/kd"]
    scaled = kd_loss(3 * student, 3 * teacher, labels, alpha=0.0, temperature=4.5)[1]["loss/kd"]
    torch.testing.assert_close(scaled, 9 * base)


def test_rpo_adds_the_chosen_replies_negative_log_likelihood():
    chosen, rejected, reference = torch.tensor([-1.0, -0.5]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.0])
    plain, _ = dpo_loss(chosen, rejected, reference, reference, beta=0.5)
    with_nll, _ = dpo_loss(chosen, rejected, reference, reference, beta=0.5, rpo_alpha=2.0)
    torch.testing.assert_close(with_nll, plain + 2.0 * 0.75)  # alpha times the chosen replies' mean NLL


# --------------------------------------------------------------------------- GRPO


def test_group_advantages_standardise_within_each_group_and_equal_rewards_teach_nothing():
    from minimind.rl.losses import group_advantages

    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 0.0, 1.0]), group_size=4)
    first = torch.tensor([1.0, 0.0, 0.5, 0.5])
    expected = (first - 0.5) / (first.std() + 1e-4)  # std of 1, 0, .5, .5 (unbiased) = 0.408
    assert torch.allclose(advantages[:4], expected) and abs(advantages[0].item() - 0.5 / (0.40825 + 1e-4)) < 1e-3
    assert torch.equal(group_advantages(torch.full((6,), 0.7), group_size=3), torch.zeros(6))
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(4), group_size=1)


@pytest.mark.parametrize(
    "equal",
    [
        torch.tensor([0.6] * 8),  # float32, as the loop's rewards were: all eight got |A| = 6e-4, of one sign
        torch.tensor([1 / 3] * 8),
        torch.tensor([1e6 + 0.1] * 8),
        torch.tensor([7.911478921803036] * 3, dtype=torch.float64),  # even in float64 the mean of three of these rounds
    ],
)
def test_a_group_of_equal_rewards_gets_exactly_zero_advantages(equal):
    from minimind.rl.losses import group_advantages

    other = torch.tensor([0.0, 1.0] * len(equal), dtype=equal.dtype)[: len(equal)]
    advantages = group_advantages(torch.cat([equal, other]), group_size=len(equal))
    assert torch.equal(advantages[: len(equal)], torch.zeros(len(equal)))
    assert torch.allclose(advantages[len(equal) :], ((other - other.mean()) / (other.std() + 1e-4)).float())  # as before


def _grpo(logps, old, advantages, mask, **kwargs):
    from minimind.rl.losses import policy_loss

    logps = logps.clone().requires_grad_(True)
    loss, metrics = policy_loss(logps, old, advantages, mask, **kwargs)
    loss.backward()
    return loss.item(), metrics, logps.grad


def test_on_policy_grpo_is_the_advantage_weighted_log_likelihood_per_completion():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics, grad = _grpo(logps, logps, advantages, mask)
    assert loss == pytest.approx((-1.0 + 2.0) / 2)  # ratio 1: -A averaged per completion, then over completions
    assert torch.allclose(grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1 / 2, 1 / 2, 0.0]]))  # -A / (length * completions)
    assert metrics["grpo/clip_fraction"] == 0 and metrics["grpo/ratio"] == pytest.approx(1.0)


def test_grpo_clips_the_ratio_and_cispo_keeps_the_gradient_of_clipped_tokens():
    logps = torch.zeros(1, 2)
    old = torch.log(torch.tensor([[1 / 1.5, 1 / 0.5]]))  # ratios 1.5 and 0.5
    advantages, mask = torch.tensor([2.0]), torch.ones(1, 2)
    loss, metrics, grad = _grpo(logps, old, advantages, mask, clip_eps=0.2)
    assert loss == pytest.approx(-(1.2 * 2 + 0.5 * 2) / 2)  # min(r A, clip(r) A): 1.2 A and 0.5 A
    assert grad[0, 0] == 0 and grad[0, 1] == pytest.approx(-0.5 * 2 / 2)  # the clipped token gets no gradient
    assert metrics["grpo/clip_fraction"] == pytest.approx(0.5)
    _, negative, _ = _grpo(logps, old, -advantages, mask, clip_eps=0.2)
    assert negative["grpo/clip_fraction"] == pytest.approx(0.5)  # with A < 0 the low side clips

    loss, metrics, grad = _grpo(logps, old, advantages, mask, clip_eps=0.2, loss_type="cispo", max_ratio=1.2)
    assert loss == pytest.approx(0.0)  # -sg(w) A log pi with log pi = 0
    assert torch.allclose(grad, torch.tensor([[-1.2 * 2 / 2, -0.5 * 2 / 2]]))  # weights capped at 1.2, never zeroed
    assert metrics["grpo/clip_fraction"] == pytest.approx(0.5)
    _, metrics, grad = _grpo(logps, old, advantages, mask, clip_eps=0.2, loss_type="cispo")
    assert torch.allclose(grad, torch.tensor([[-1.5 * 2 / 2, -0.5 * 2 / 2]]))  # its own cap (5 by default), not GRPO's clip_eps
    assert metrics["grpo/clip_fraction"] == 0
    with pytest.raises(ValueError, match="unknown loss type"):
        _grpo(logps, old, advantages, mask, loss_type="ppo2")


def test_the_kl_term_is_the_k3_estimate_to_the_reference():
    logps, mask = torch.tensor([[-1.0, -1.0]]), torch.tensor([[1, 0]])
    reference = torch.tensor([[-0.5, -3.0]])  # ref - logp = 0.5 on the counted token
    k3 = math.exp(0.5) - 0.5 - 1
    loss, metrics, _ = _grpo(logps, logps, torch.zeros(1), mask, reference_logps=reference, kl_coef=0.1)
    assert metrics["grpo/kl"].item() == pytest.approx(k3) and loss == pytest.approx(0.1 * k3)
    _, same, _ = _grpo(logps, logps, torch.zeros(1), mask, reference_logps=logps.clone(), kl_coef=0.1)
    assert same["grpo/kl"].item() == 0.0


def test_cispo_divides_by_the_tokens_of_the_whole_batch_and_grpo_by_its_completions():
    # MiniMax-M1's CISPO: 1 / sum|o_i| over the batch, so every token weighs alike whatever its completion's length
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # lengths 3 and 1: 4 tokens
    advantages = torch.tensor([1.0, -2.0])
    loss, _, grad = _grpo(logps, logps, advantages, mask, loss_type="cispo")
    assert loss == pytest.approx(-(1.0 * (-3.5) + -2.0 * (-0.3)) / 4)  # -sum A log pi / 4 tokens
    assert torch.allclose(grad, torch.tensor([[-1 / 4] * 3, [2 / 4, 0, 0]]))  # -A / 4 for every token, long or short
    _, _, grpo_grad = _grpo(logps, logps, advantages, mask)
    assert torch.allclose(
        grpo_grad, torch.tensor([[-1 / 6] * 3, [2 / 2, 0, 0]])
    )  # -A / (length * completions): GRPO's length bias

    # a micro-batch of an accumulated batch passes the batch's counts; the micro-batch losses add up to the batch's
    for loss_type in ("cispo", "grpo"):
        whole, _, whole_grad = _grpo(logps, logps, advantages, mask, loss_type=loss_type)
        parts = [
            _grpo(
                logps[i : i + 1],
                logps[i : i + 1],
                advantages[i : i + 1],
                mask[i : i + 1],
                loss_type=loss_type,
                tokens=torch.tensor(4.0),
                completions=2,
            )
            for i in range(2)
        ]
        assert sum(part[0] for part in parts) == pytest.approx(whole)
        assert torch.allclose(torch.cat([part[2] for part in parts]), whole_grad)


def test_log_probabilities_at_a_temperature_are_those_of_softmax_of_the_logits_over_it():
    from minimind.model.losses import token_logprobs

    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    expected = F.log_softmax((hidden @ head.T)[:, :-1] / 0.5, dim=-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    expected = expected.masked_fill(labels[:, 1:] == IGNORE_INDEX, 0.0)
    torch.testing.assert_close(token_logprobs(hidden, head, labels, temperature=0.5), expected)
    torch.testing.assert_close(token_logprobs(hidden, head, labels), token_logprobs(hidden, head, labels, temperature=1.0))
    with pytest.raises(ValueError, match="above 0"):
        token_logprobs(hidden, head, labels, temperature=0.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_one_token_bandit_gets_the_policy_gradient_of_the_policy_that_sampled(temperature):
    """Rollouts at T draw a ~ softmax(z / T): REINFORCE's gradient of A log pi_T(a) in the logits z is
    A (onehot(a) - pi_T) / T. Scored at T = 1 it was A (onehot(a) - pi_1): at T = 0.5 half as large
    against the KL term, and pointing elsewhere."""
    from minimind.model.losses import token_logprobs
    from minimind.rl.losses import policy_loss

    torch.manual_seed(0)
    vocab, action, advantage = 6, 2, 1.5
    logits = torch.randn(vocab, requires_grad=True)
    hidden = torch.stack([logits, torch.zeros(vocab)])[None]  # an identity head: position 0's logits are `logits`
    labels = torch.tensor([[IGNORE_INDEX, action]])  # the one completion token
    logps = token_logprobs(hidden, torch.eye(vocab), labels, temperature=temperature)
    loss, _ = policy_loss(logps, logps.detach(), torch.tensor([advantage]), labels[:, 1:] != IGNORE_INDEX)
    loss.backward()
    sampled_from = torch.softmax(logits.detach() / temperature, dim=-1)
    ascent = advantage * (F.one_hot(torch.tensor(action), vocab) - sampled_from) / temperature
    torch.testing.assert_close(logits.grad, -ascent)
