"""The rollout actor of GRPO samples with the weights it was handed last, through Ray's object store."""

import pytest
import ray
import torch
from conftest import random_model

from minimind.inference.generate import generate
from minimind.model.lora import LoRAConfig, add_lora
from minimind.rl.rollout import RolloutWorker

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
        sampled = [
            ray.get(actor.generate.remote(PROMPTS, 2, {"max_new_tokens": 6, "temperature": 1.0, "seed": 3})) for _ in range(2)
        ]
        assert sampled[0]["completions"] == sampled[1]["completions"]  # a seed fixes the rollouts (an exact resume)
        try:
            ray.get(actor.load_weights.remote({"not.a.weight": torch.zeros(1)}, 9))
            raise AssertionError("foreign weights were accepted")
        except ray.exceptions.RayTaskError as error:
            assert "does not have" in str(error)
    finally:
        ray.kill(actor)


def test_a_lora_policy_hands_over_only_its_adapters(ray_cluster):
    from minimind.rl.grpo import hand_over

    config = LoRAConfig(rank=2, targets=["q_proj", "v_proj"])
    policy = add_lora(random_model(seed=1), config)
    actor = ray.remote(RolloutWorker).options(num_cpus=0).remote(policy.config.to_dict(), config, bf16=False)
    try:
        ray.get(actor.load_weights.remote(ray.put(hand_over(policy, whole=True)), 0))  # the base and fresh adapters, once
        with torch.no_grad():  # then an update moves only the adapters
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        assert local(policy) != ray.get(actor.generate.remote(PROMPTS, 2, GREEDY))["completions"]
        adapters = hand_over(policy, whole=False)
        assert sum(t.numel() for t in adapters.values()) < sum(t.numel() for t in policy.state_dict().values()) / 10
        ray.get(actor.load_weights.remote(ray.put(adapters), 1))
        assert ray.get(actor.generate.remote(PROMPTS, 2, GREEDY))["completions"] == local(policy)
    finally:
        ray.kill(actor)


def test_the_hand_over_sends_each_tensor_once_and_a_missing_one_is_refused():
    from minimind.rl.grpo import hand_over

    policy = random_model(seed=1)
    state = hand_over(policy, whole=True)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state  # the tied head is the embedding
    assert sum(t.numel() for t in state.values()) == policy.num_parameters()  # each parameter once (8.97 MB for 8.24 before)
    worker = RolloutWorker(policy.config.to_dict(), bf16=False)  # in-process: the actor's own code, no Ray
    worker.load_weights(state, 0)
    assert torch.equal(worker.model.lm_head.weight, policy.lm_head.weight)  # its tied head came with the embedding
    assert all(torch.equal(worker.model.state_dict()[k], v) for k, v in policy.state_dict().items())

    partial = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 of the rollout model's tensors.*model\.norm\.weight"):
        RolloutWorker(policy.config.to_dict(), bf16=False).load_weights(partial, 0)
    with pytest.raises(ValueError, match="does not have"):
        worker.load_weights({**state, "not.a.weight": torch.zeros(1)}, 1)

    config = LoRAConfig(rank=2, targets=["q_proj"])
    lora_policy = add_lora(random_model(seed=1), config)
    lora_worker = RolloutWorker(policy.config.to_dict(), config, bf16=False)
    with pytest.raises(ValueError, match="lacks"):  # adapters alone need a whole model in place first
        lora_worker.load_weights(hand_over(lora_policy, whole=False), 0)
    with pytest.raises(ValueError, match="lacks .*lora_"):  # a base without its adapters
        lora_worker.load_weights(hand_over(random_model(seed=1), whole=True), 0)
    lora_worker.load_weights(hand_over(lora_policy, whole=True), 0)
    adapters = hand_over(lora_policy, whole=False)
    with pytest.raises(ValueError, match="lacks 1 of the rollout adapter's tensors"):
        lora_worker.load_weights(
            {k: v for k, v in adapters.items() if not k.startswith("model.layers.0.self_attn.q_proj.lora_A")}, 1
        )
    assert lora_worker.load_weights(adapters, 1) == 1
