"""The driver's held-out evaluation scores rows exactly as the stage trains on them: at its `seq_len`."""

import json

import pytest
from conftest import random_model

from minimind.driver.evaluate import pair_logps, preference_wins
from minimind.driver.runner import eval_coverage, evaluate
from minimind.driver.stages import STAGES
from minimind.model.tokenizer import train_tokenizer
from minimind.training.heldout import heldout_loss


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["小明喜欢红色。小红住在北京。12 加 30 等于 42。"] * 20, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(vocab_size=len(tokenizer))


def chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_heldout_loss_uses_the_stage_seq_len_and_reports_cut_and_dropped_rows(tmp_path, tokenizer, model):
    records = [
        {"conversations": chat("小明喜欢什么？", "红色。")},  # fits
        {"conversations": chat("小红住在哪？", "小红住在北京。" * 6)},  # the reply is cut
        {"conversations": chat("小明喜欢红色。" * 8 + "小明喜欢什么？", "红色。")},  # the prompt fills the row: dropped
    ]
    path = write_jsonl(tmp_path / "sft_eval.jsonl", records)
    seq_len = 100  # the first row is exactly 100 tokens (the template adds a system prompt)
    metrics, _ = evaluate("sft", model, tokenizer, path, limit=10, seq_len=seq_len)
    assert metrics["eval/heldout_loss"] == pytest.approx(heldout_loss(model, tokenizer, path, kind="sft", seq_len=seq_len))
    assert metrics["eval/heldout_loss"] != pytest.approx(heldout_loss(model, tokenizer, path, kind="sft", seq_len=256))
    assert eval_coverage("sft", tokenizer, path, limit=10, seq_len=seq_len) == {
        "eval/rows": 2,
        "eval/rows_cut": 2,
        "eval/rows_dropped": 1,
    }
    assert eval_coverage("sft", tokenizer, path, limit=10, seq_len=256) == {
        "eval/rows": 3,
        "eval/rows_cut": 0,
        "eval/rows_dropped": 0,
    }
    assert (
        eval_coverage("sft", tokenizer, path, limit=1, seq_len=seq_len)["eval/rows"] == 1
    )  # the limit counts records, first to last


def test_dpo_pairs_are_scored_at_the_stage_seq_len(tmp_path, tokenizer, model):
    pair = {"chosen": chat("小明喜欢什么？", "红色。" * 30), "rejected": chat("小明喜欢什么？", "北京。" * 30)}
    path = write_jsonl(tmp_path / "dpo_eval.jsonl", [pair, pair])
    metrics, _ = evaluate("dpo", model, tokenizer, path, limit=10, seq_len=120, reference=model)
    assert metrics["eval/preference_accuracy"] == preference_wins(*pair_logps(model, tokenizer, path, seq_len=120))["accuracy"]
    assert eval_coverage("dpo", tokenizer, path, limit=10, seq_len=120)["eval/rows_cut"] == 2
    assert eval_coverage("dpo", tokenizer, path, limit=10, seq_len=512)["eval/rows_cut"] == 0


def test_gpu_placement_follows_the_flag_the_cluster_and_what_the_autoscaler_can_launch(ray_cluster, tmp_path, monkeypatch):
    from dataclasses import replace

    from minimind.driver.cluster import GPU_WORKER_CPUS, placement
    from minimind.training.configs import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))  # no launcher config here: this cluster has 2 CPUs and no GPU
    config = TrainConfig(num_workers=2)
    assert placement(config)[:2] == (False, 1.0) and "training on CPU" in placement(config)[2]
    assert placement(replace(config, use_gpu=True))[:2] == (True, GPU_WORKER_CPUS)  # asked: the autoscaler must bring them
    assert placement(replace(config, use_gpu=True, cpus_per_worker=3))[:2] == (True, 3)
    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        "available_node_types:\n  head: {resources: {CPU: 0}}\n"
        "  gpu_worker: {min_workers: 0, max_workers: 4, resources: {CPU: 4, GPU: 1}}\n"
    )
    use_gpu, cpus, why = placement(config)  # none up yet, but the cluster can launch them: ask, so that it does
    assert (use_gpu, cpus) == (True, GPU_WORKER_CPUS) and "gpu_worker" in why
    assert placement(replace(config, use_gpu=False))[0] is False


def test_grpo_placement_counts_the_rollout_actors_gpus(ray_cluster, tmp_path, monkeypatch):
    import ray

    from minimind.driver.cluster import placement
    from minimind.training.configs import GRPOConfig, SFTConfig

    monkeypatch.setenv("HOME", str(tmp_path))  # no launcher config: no GPU node can be launched
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})  # one GPU up
    assert placement(SFTConfig(gpus_per_worker=1.0))[0] is True
    assert placement(GRPOConfig())[0] is True  # trainer 0.5 + rollout actor 0.5 share the one GPU
    use_gpu, _, why = placement(GRPOConfig(gpus_per_worker=1.0, rollout_gpus=0.5))  # 1.5 GPUs needed: would wait forever
    assert use_gpu is False and "training on CPU" in why


def test_a_job_unpacked_by_ray_keeps_its_results_in_the_home_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from minimind.tracking import project_root

    monkeypatch.delenv("MINIMIND_HOME", raising=False)
    unpacked = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (unpacked / "minimind").mkdir(parents=True)
    (unpacked / "pyproject.toml").write_text("")
    assert project_root(unpacked / "minimind") == Path.home() / ".minimind"
    (tmp_path / "checkout" / "minimind").mkdir(parents=True)
    (tmp_path / "checkout" / "pyproject.toml").write_text("")
    assert project_root(tmp_path / "checkout" / "minimind") == tmp_path / "checkout"


def test_rank_zero_metric_logging_reports_a_failing_tracking_server_and_training_goes_on(capsys):
    from types import SimpleNamespace

    from minimind.training.loop import MetricLogger

    logger = MetricLogger(SimpleNamespace(stage=STAGES["sft"], mlflow_run_id=None, mlflow_tracking_uri=None), total_steps=2)
    sent = []

    class FlakyServer:
        def log_batch(self, run_id, metrics):
            if not sent:
                sent.append("refused")
                raise ConnectionError("tracking server unreachable")
            sent.append([m.key for m in metrics])

    logger.job.mlflow_run_id, logger.client = "run", FlakyServer()
    logger.log_metrics(1, {"train/loss": 2.0})  # fails on the logging thread: reported, not raised
    logger.log_metrics(2, {"train/loss": 1.5})
    logger.close()
    assert sent == ["refused", ["train/loss"]]
    assert (
        "MLflow metrics of step 1 not logged (ConnectionError: tracking server unreachable); training goes on"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"lora_rank": 4, "lora_alpha": 0.0}, "--lora-alpha must be positive, not 0: .* neither act nor train"),
        ({"lora_rank": 4, "lora_alpha": -8.0}, "--lora-alpha must be positive, not -8"),
        ({"lora_rank": 4, "lora_dropout": 1.5}, r"--lora-dropout .* in \[0, 1\), not 1.5"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, r"--lora-dropout .* in \[0, 1\), not 1$"),
        ({"lora_rank": 4, "lora_dropout": -0.1}, r"--lora-dropout .* not -0.1"),
        ({"lora_targets": "q_proj,v_proj"}, "^--lora-targets: LoRA settings, which need --lora-rank"),
        ({"lora_alpha": 8.0, "lora_dropout": 0.1}, "^--lora-alpha, --lora-dropout: LoRA settings, which need --lora-rank"),
        ({"merge": True}, "^--merge: LoRA settings, which need --lora-rank"),
        ({"lora_rank": -1}, "--lora-rank must be positive, not -1"),
        ({"lora_rank": 4, "lora_targets": "lm_head"}, "--lora-targets: unknown LoRA target 'lm_head'"),
    ],
)
def test_check_lora_flags_refuses_each_lora_flag_that_cannot_work(flags, message):
    """run_stage calls check_lora_flags first of all: a worker would meet --lora-dropout 1.5 only after the
    data's preparation and the first evaluation, and alpha 0 or flags without --lora-rank would "succeed"."""
    from minimind.driver.inputs import check_lora_flags
    from minimind.training.configs import SFTConfig

    with pytest.raises(SystemExit, match=message):
        check_lora_flags(SFTConfig(**flags), STAGES["sft"])
    check_lora_flags(
        SFTConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="attention", merge=True), STAGES["sft"]
    )
    check_lora_flags(SFTConfig(), STAGES["sft"])


def test_lora_settings_that_cannot_work_are_refused_by_the_adapter_config_too():
    from minimind.model.lora import LoRAConfig

    for settings, message in [
        ({"rank": 0}, "rank is a positive integer, not 0"),
        ({"rank": 4, "alpha": 0.0}, "alpha must be positive"),
        ({"rank": 4, "alpha": float("nan")}, "alpha must be positive"),
        ({"rank": 4, "dropout": 1.5}, r"dropout is a probability in \[0, 1\), not 1.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**settings)
    assert LoRAConfig(rank=4, alpha=8.0, dropout=0.1).scaling == 2.0
