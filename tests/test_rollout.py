"""The rollout actor of GRPO samples with the weights it was handed last, through Ray's object store."""

import ray
import torch

from conftest import random_model
from minimind.generate import generate
from minimind.lora import LoRAConfig, adapter_state, add_lora
from minimind.rollout import RolloutWorker

PROMPTS = [[5, 6, 7], [9, 10]]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0}


def local(model):
    return [c for c in generate(model, PROMPTS, **GREEDY) for _ in range(2)]  # two per prompt, as the actor's group


def test_the_rollout_actor_generates_with_the_weights_of_the_latest_update(ray_cluster):
    first, second = random_model(seed=1), random_model(seed=2)
    assert local(first) != local(second)
    actor = ray.remote(RolloutWorker).options(num_cpus=0).remote(first.config.to_dict(), bf16=False)
    try:
        for version, model in enumerate([first, second, first]):
            assert ray.get(actor.load_weights.remote(ray.put(model.state_dict()), version)) == version
            out = ray.get(actor.generate.remote(PROMPTS, 2, GREEDY))
            assert out["version"] == version and out["completions"] == local(model)
            assert out["finished"] == [len(c) < 6 for c in local(model)]  # ended by its stop token, not the budget
        near_the_end = [[5] * (first.config.max_position_embeddings - 3)]  # room for 3 of the 6 tokens asked for
        cut = ray.get(actor.generate.remote(near_the_end, 2, {**GREEDY, "stop_token_ids": [-1]}))
        assert [len(c) for c in cut["completions"]] == [3, 3] and cut["finished"] == [False, False]  # cut off by the context
        sampled = [ray.get(actor.generate.remote(PROMPTS, 2, {"max_new_tokens": 6, "temperature": 1.0, "seed": 3})) for _ in range(2)]
        assert sampled[0]["completions"] == sampled[1]["completions"]  # a seed fixes the rollouts (an exact resume)
        try:
            ray.get(actor.load_weights.remote({"not.a.weight": torch.zeros(1)}, 9))
            raise AssertionError("foreign weights were accepted")
        except ray.exceptions.RayTaskError as error:
            assert "does not have" in str(error)
    finally:
        ray.kill(actor)


def test_a_lora_policy_hands_over_only_its_adapters(ray_cluster):
    config = LoRAConfig(rank=2, targets=["q_proj", "v_proj"])
    policy = add_lora(random_model(seed=1), config)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    actor = ray.remote(RolloutWorker).options(num_cpus=0).remote(policy.config.to_dict(), config, bf16=False)
    try:
        ray.get(actor.load_weights.remote(ray.put(random_model(seed=1).state_dict()), 0))  # the base, once
        adapters = adapter_state(policy)
        assert sum(t.numel() for t in adapters.values()) < sum(t.numel() for t in policy.state_dict().values()) / 10
        ray.get(actor.load_weights.remote(ray.put(adapters), 1))
        assert ray.get(actor.generate.remote(PROMPTS, 2, GREEDY))["completions"] == local(policy)
    finally:
        ray.kill(actor)
