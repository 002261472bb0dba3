"""The pieces of GRPO's loop (minimind.rl.grpo), in-process on tiny models: the policy scored at the sampling
temperature, its update's gradient, ratios at unchanged weights, the hand-over to the rollout actor, and
the reward statistics over every rank."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

from minimind.driver.stages import STAGES
from minimind.model.checkpoint import save_model
from minimind.model.losses import IGNORE_INDEX
from minimind.model.model import unwrap
from minimind.rl.grpo import (
    Prompt,
    active_tokens,
    completion_logprobs,
    hand_over,
    micro_batches,
    policy_to_train,
    rollout_stats,
    score_before_update,
    sequences,
    update,
)
from minimind.rl.rollout import RolloutWorker
from minimind.training.configs import GRPOConfig
from minimind.training.loop import StageJob, adamw

EOS, PAD = 2, 0
CPU = torch.device("cpu")


def rollouts(group_size: int = 2):
    """Two prompts of different lengths, each with completions of different lengths, one cut off (no stop token)."""
    prompts = [Prompt([1, 5, 9, 4], None), Prompt([1, 7], None)]
    completions = [[11, 12, 13, 14, 15], [16], [17, 18], [19, 20, 21]][: 2 * group_size]
    return sequences(prompts, completions, [True, True, False, True], group_size, EOS, PAD)


def reference_logprobs(model, ids, labels, temperature):
    """log softmax(logits / T) of each labelled next token, written out in full."""
    logits = model(ids).logits[:, :-1].float()
    targets = labels[:, 1:]
    logps = F.log_softmax(logits / temperature, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logps.masked_fill(targets == IGNORE_INDEX, 0.0)


def test_completions_are_scored_at_the_temperature_they_were_sampled_at():
    model = random_model()
    ids, labels = rollouts()
    with torch.no_grad():
        for temperature in (0.5, 1.0, 1.7):
            torch.testing.assert_close(
                completion_logprobs(model, ids, labels, temperature), reference_logprobs(model, ids, labels, temperature)
            )


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_an_update_follows_the_policy_gradient_of_the_policy_that_sampled(loss_type):
    """With grad accumulation over completions of uneven lengths, at T = 0.5: the step's gradient is
    -sum_i A_i sum_t grad log pi_T / |o_i| / completions (grpo) or / all tokens of the step (cispo)."""
    temperature = 0.5
    config = GRPOConfig(loss_type=loss_type, temperature=temperature, grad_accum=2, kl_coef=0.0, grad_clip=0.0)
    ids, labels = rollouts()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    policy, expected = random_model(), random_model()
    params = list(policy.parameters())
    before = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=1.0)  # one step of lr 1: the parameters move by minus the gradient
    update(policy, sgd, params, ids, labels, advantages, None, None, micro_batches(len(ids), config.grad_accum), config, [1.0])

    mask = (labels[:, 1:] != IGNORE_INDEX).float()
    weighted = advantages[:, None] * reference_logprobs(expected, ids, labels, temperature) * mask
    if loss_type == "grpo":
        objective = (weighted.sum(1) / mask.sum(1)).sum() / len(ids)
    else:
        objective = weighted.sum() / mask.sum()
    (-objective).backward()
    for start, after, param in zip(before, params, expected.parameters()):
        torch.testing.assert_close(start - after, param.grad, rtol=1e-4, atol=1e-6)


@pytest.fixture
def policy_dir(tmp_path):
    # dropout in the model (a checkpoint's config may have it) and, below, in the adapters
    return save_model(random_model(dropout=0.1), tmp_path / "policy")


def test_ratios_are_exactly_one_at_unchanged_weights_and_the_rollout_actor_samples_the_trained_policy(policy_dir):
    config = GRPOConfig(
        lora_rank=4,
        lora_dropout=0.1,
        lora_targets="all",
        updates_per_rollout=2,
        grad_accum=2,
        temperature=0.7,
        clip_eps=1e-6,
        kl_coef=0.1,
        lr=0.0,
    )
    job = StageJob(STAGES["grpo"], config, init_dir=str(policy_dir), data_path="")
    policy, lora = policy_to_train(job, STAGES["grpo"], CPU)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # adapters that act
    ids, labels = rollouts()
    chunks = micro_batches(len(ids), config.grad_accum)

    noisy = copy.deepcopy(policy).train()  # as the loop trained before: dropout on, every forward another policy
    with torch.no_grad():
        assert not torch.equal(completion_logprobs(noisy, ids, labels), completion_logprobs(noisy, ids, labels))

    old, ref = score_before_update(policy, copy.deepcopy(policy), ids, labels, chunks, config)
    for rows in chunks:  # the update's own forward, with autograd on
        torch.testing.assert_close(
            completion_logprobs(policy, ids[rows], labels[rows], config.temperature), old[rows], rtol=0, atol=0
        )
    params, optimizer = adamw(policy, config, CPU)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    metrics = update(policy, optimizer, params, ids, labels, advantages, old, ref, chunks, config, [0.0, 0.0])
    assert metrics["grpo/clip_fraction"] == 0  # not one ratio off 1 by 1e-6
    assert metrics["grpo/kl"] == 0  # the reference, at the same temperature, is the same policy
    assert metrics["grpo/ratio"] == pytest.approx(1.0, abs=1e-6)

    worker = RolloutWorker(unwrap(policy).config.to_dict(), lora, bf16=False)  # the actor's own code, in-process
    worker.load_weights(hand_over(policy, whole=True), 0)
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logprobs(worker.model, ids, labels, 0.7), completion_logprobs(policy, ids, labels, 0.7), rtol=0, atol=0
        )


def test_compile_is_honoured(policy_dir):
    job = StageJob(STAGES["grpo"], GRPOConfig(compile=True), init_dir=str(policy_dir), data_path="")
    policy, _ = policy_to_train(job, STAGES["grpo"], CPU)
    assert hasattr(policy.forward, "_torchdynamo_orig_callable")  # compiled on its first call
    plain, _ = policy_to_train(replace(job, config=GRPOConfig()), STAGES["grpo"], CPU)
    assert not hasattr(plain.forward, "_torchdynamo_orig_callable")


RANKS = [  # each rank's rollouts: totals, the rewards' values, completions, finished, trained tokens
    ([1.0, 0.0, 0.6, 0.6], {"answer": [1.0, 0.0, 1.0, 1.0]}, [[5, 6], [7], [8, 9, 10], [11]], [True, False, True, True], 11),
    ([0.2, 0.2, 3.0, 1.0], {"answer": [0.0, 0.0, 1.0, 0.0]}, [[5], [7], [8], [9, 9, 9, 9]], [True, True, True, True], 9),
]


def _stats_on_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        totals, values, completions, finished, tokens = RANKS[rank]
        stats, all_tokens = rollout_stats(totals, values, completions, finished, 2, tokens, torch.device("cpu"), world)
        trained = torch.ones(1, tokens, dtype=torch.bool)  # this rank's completion tokens: 11 and 9
        divisor = float(active_tokens(trained, world))
        Path(out_dir, f"{rank}.json").write_text(json.dumps([stats, all_tokens, divisor]))
    finally:
        torch.distributed.destroy_process_group()


def test_reward_statistics_are_over_every_ranks_rollouts(tmp_path):
    torch.multiprocessing.spawn(_stats_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # every rank has the same figures
    stats, tokens, cispo_divisor = results[0]
    assert cispo_divisor == 20 / 2  # every rank divides by the step's tokens on all ranks, over the ranks DDP averages
    totals = torch.tensor(RANKS[0][0] + RANKS[1][0], dtype=torch.float64)
    answers = torch.tensor(RANKS[0][1]["answer"] + RANKS[1][1]["answer"], dtype=torch.float64)
    assert stats["reward/total/mean"] == pytest.approx(float(totals.mean()))
    assert stats["reward/total/std"] == pytest.approx(float(totals.std(unbiased=False)))
    assert stats["reward/answer/mean"] == pytest.approx(float(answers.mean()))  # 0.5: rank 0 alone said 0.75
    assert stats["completion/length"] == pytest.approx(14 / 8) and stats["completion/cut_off"] == pytest.approx(1 / 8)
    assert stats["grpo/equal_reward_groups"] == pytest.approx(2 / 4)  # (0.6, 0.6) and (0.2, 0.2)
    assert tokens == 20
    alone, _ = rollout_stats(*RANKS[0][:4], 2, RANKS[0][4], torch.device("cpu"), 1)
    assert alone["reward/answer/mean"] == pytest.approx(0.75)
