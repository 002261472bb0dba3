"""A real GRPO job on the tiny preset: rollouts by a Ray actor, rewards from a reward model, a rising reward,
its metrics in MLflow and a registered `minimind-grpo` version."""

from dataclasses import replace

import pytest
import torch
from conftest import mlflow_client as client
from conftest import random_model

from minimind.driver.runner import run_stage
from minimind.model.checkpoint import save_model
from minimind.model.config import ModelConfig
from minimind.model.model import MiniMindForCausalLM
from minimind.model.tokenizer import load_tokenizer
from minimind.training.configs import GRPOConfig


def test_grpo_raises_the_reward_it_is_given(mlflow_store, tmp_path, fast_train_polls):
    from minimind.demo import demo_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    shape = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    policy = MiniMindForCausalLM(ModelConfig.from_name("tiny", **shape))  # samples near uniformly ...
    with torch.no_grad():  # ... with one shared embedding dimension that makes the end of turn likelier: about 1 reply in 5
        policy.model.embed_tokens.weight[:, 0] = 1.0  # ends within 6 tokens, so the length reward tells replies apart
        policy.model.embed_tokens.weight[tokenizer.eos_token_id, 0] = 1.4
    save_model(policy, tmp_path / "policy", tokenizer=tokenizer)
    save_model(random_model("tiny", **shape), tmp_path / "judge", tokenizer=tokenizer)
    config = GRPOConfig(
        init=str(tmp_path / "policy"), reward_model=str(tmp_path / "judge"), rewards="length=1,model=0.01", length_limit=2,
        max_steps=14, batch_size=2, group_size=8, max_new_tokens=6, lr=1e-2, kl_coef=0.01, checkpoint_every=7, log_every=1,
        eval_limit=4, seq_len=128, storage_path=str(tmp_path / "ray"), val_every=7,
    )
    assert run_stage(replace(config, stop_after=7), "grpo").model_uri == ""  # interrupted after its checkpoint at step 7
    result = run_stage(replace(config, resume=True), "grpo")
    assert result.model_uri == "models:/minimind-grpo/1"
    run_id = client().get_model_version("minimind-grpo", "1").run_id
    history = sorted(client().get_metric_history(run_id, "reward/length/mean"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(8, 15))  # continued at step 8
    first = client().search_runs(
        [client().get_run(run_id).info.experiment_id], "tags.stage = 'grpo'", order_by=["attributes.start_time ASC"]
    )[0]
    rewards = [
        m.value for m in sorted(client().get_metric_history(first.info.run_id, "reward/length/mean"), key=lambda m: m.step)
    ]
    rewards += [m.value for m in history]
    assert len(rewards) == 14
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3, rewards  # it learned to end its replies early
    assert client().get_metric_history(run_id, "reward/model/mean")  # the judge's scores, weighted in
    metrics = client().get_run(run_id).data.metrics
    for name in (
        "reward/total/std",
        "reward/length/mean",
        "grpo/kl",
        "grpo/clip_fraction",
        "completion/length",
        "time/rollout_s",
        "time/update_s",
        "time/handover_s",
        "rollout/handover_mb",
    ):
        assert name in metrics, name
    assert client().get_run(run_id).data.tags["lineage.reward_model"] == str(tmp_path / "judge")
    handover = {m.step: m.value for m in client().get_metric_history(first.info.run_id, "rollout/handover_mb")}
    assert handover[1] == pytest.approx(policy.num_parameters() * 4 / 2**20)  # the whole model, the tied head not twice
    assert [m.step for m in client().get_metric_history(first.info.run_id, "val/loss")] == [7]  # --val-every is honoured
    assert [m.step for m in client().get_metric_history(run_id, "val/loss")] == [14] and 0 < metrics["val/loss"] < 20


def test_grpo_settings_that_cannot_work_are_refused(mlflow_store):
    with pytest.raises(SystemExit, match="--reward-model go together"):
        run_stage(GRPOConfig(rewards="answer=1,model=1"), "grpo")
    with pytest.raises(SystemExit, match="unknown reward"):
        run_stage(GRPOConfig(rewards="answr=1"), "grpo")
    with pytest.raises(SystemExit, match="--group-size must be at least 2"):
        run_stage(GRPOConfig(group_size=1), "grpo")
    with pytest.raises(SystemExit, match="grpo or cispo"):
        run_stage(GRPOConfig(loss_type="ppo"), "grpo")
    with pytest.raises(SystemExit, match="--temperature must be above 0"):
        run_stage(GRPOConfig(temperature=0.0), "grpo")
    with pytest.raises(SystemExit, match="--top-p in"):
        run_stage(GRPOConfig(top_p=1.5), "grpo")
    with pytest.raises(SystemExit, match="--loader-workers: GRPO has no data loader"):
        run_stage(GRPOConfig(loader_workers=2), "grpo")
    with pytest.raises(SystemExit, match="--cispo-max-ratio .* above 1"):
        run_stage(GRPOConfig(loss_type="cispo", cispo_max_ratio=0.5), "grpo")
    with pytest.raises(SystemExit, match="--cispo-max-ratio .* above 1"):
        run_stage(GRPOConfig(loss_type="cispo", cispo_max_ratio=float("nan")), "grpo")
    with pytest.raises(SystemExit, match="--temperature must be above 0"):
        run_stage(GRPOConfig(temperature=float("nan")), "grpo")
