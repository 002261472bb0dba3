"""The README's first command, shortened: the whole pipeline on the demo world, every stage a real Ray
Train run registered in MLflow, and every stage's held-out metric better after it than before. The one
run also serves as every stage's registration and hand-over test: what each run records, the clip
stage's cache, and white-box KD from the pipeline's own models."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import pipeline  # noqa: E402


@pytest.fixture
def home(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def test_pipeline_runs_every_stage_and_each_improves_its_heldout_metric(home, capsys, monkeypatch, fast_train_polls):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    results = pipeline.main(["--scale", "0.03", "--eval-limit", "8", "--report", str(home / "docs" / "results.md")])
    by_stage = {result.stage: result for result in results}
    assert list(by_stage) == ["pretrain", "sft", "dpo", "reason", "tools", "clip", "vlm_pretrain", "vlm_sft"]
    assert [result.model_uri for result in results] == [
        "models:/minimind-pretrain/1", "models:/minimind-sft/1", "models:/minimind-dpo/1", "models:/minimind-reason/1",
        "models:/minimind-tools/1", "models:/minimind-clip-demo/1", "models:/minimind-vlm-pretrain/1",
        "models:/minimind-vlm-sft/1",
    ]
    for stage in ("pretrain", "sft", "reason", "tools", "vlm_pretrain", "vlm_sft"):
        assert by_stage[stage].after["eval/heldout_loss"] < by_stage[stage].before["eval/heldout_loss"], stage
    tools = by_stage["tools"].after  # every figure of the tool-use table is measured (a few steps teach no calls yet)
    assert all(0.0 <= tools[f"eval/{key}"] <= 1.0 for key in ("tool_call_accuracy", "no_call_accuracy", "tool_answer_accuracy"))
    dpo = by_stage["dpo"]
    assert dpo.before["eval/rewards_margin"] == 0.0  # the policy starts as its own reference
    assert dpo.after["eval/rewards_margin"] > 0.0  # the chosen replies gained on the rejected ones (6 steps at lr 3e-5: no more)

    printed = capsys.readouterr().out
    assert "whole pipeline:" in printed and "training results:" in printed and "describing 200 held-out pictures" in printed
    for stage in by_stage:
        assert f"\n{stage} " in printed  # rows of the summary table per stage
    assert "answer_exact_match/held_out_phrasing" in printed and "reasoning_accuracy/addition" in printed
    assert "tool_call_accuracy" in printed
    assert "lm-evaluation-harness (minimind_demo), on each text stage's model:" in printed
    assert "the issue's targets, every seed (0):\n| held-out, every seed | seed 0 | mean |" in printed

    # The report, written from this run: the targets with seed 0's figures, every stage, the machine, the command.
    written = (home / "docs" / "results.md").read_text(encoding="utf-8")
    assert "Written by `python jobs/pipeline.py --scale 0.03 --eval-limit 8 --report " in written
    exact_match = next(line for line in written.splitlines() if line.startswith("| SFT answer exact match |"))
    assert f"| {by_stage['sft'].after['eval/answer_exact_match']:.3f} |" in exact_match and exact_match.endswith(("✓ |", "✗ |"))
    assert "| answer_exact_match | 8 |" in written  # the first --eval-limit records of SFT's held-out file
    for stage in by_stage:
        assert f"\n### {stage}: " in written
    assert "- CPU: " in written and "- torch: " in written and "| 0 | vlm_pretrain |" in written
    harness_row = next(line for line in written.splitlines() if line.startswith("| reason |") and "." in line)
    assert len(harness_row.split("|")) == 2 + 4  # the stage, then facts acc and acc_norm and the sums' exact match

    # One MLflow parent run groups the stage runs and holds the side-by-side answers and the pictures' report.
    import mlflow

    runs = mlflow.search_runs(experiment_names=["minimind"], output_format="list")
    parents = [run for run in runs if run.info.run_name.startswith("pipeline-")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["seed"] == "0" and parent.data.params["seed"] == "0"
    assert [
        artifact.path for artifact in mlflow.MlflowClient().list_artifacts(parent.info.run_id) if artifact.path == "results.md"
    ]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["stage"] for run in children) == sorted(by_stage)
    table = mlflow.load_table("training_results.json", run_ids=[parent.info.run_id])
    assert {"task", "prompt", "pretrain", "sft", "dpo", "reason", "reference"} <= set(table.columns) and len(table) == 5
    # at 3% of the steps a model may well answer nothing: the pictures' report is checked for being there, not for its values
    assert (
        0.0 <= parent.data.metrics["vlm_sft/hallucination_rate"] <= 1.0
        and parent.data.metrics["vlm_pretrain/mean_reply_chars"] >= 0
    )

    # What each stage run records, on the SFT run: where it started, its settings, the loss at every logged
    # step, held-out metrics before and after, the loss curve and samples, the prepared data's report, the
    # files as MLflow dataset inputs and the host's load as system metrics; and its weights moved.
    from minimind.model.checkpoint import load_model

    client = mlflow.MlflowClient()
    sft_run = client.get_run(client.get_model_version("minimind-sft", "1").run_id)
    assert sft_run.data.tags["source.name"] == "minimind-pretrain" and sft_run.data.tags["source.version"] == "1"
    assert sft_run.data.params["lr"] == str(next(config for name, config, _ in pipeline.STAGES if name == "sft").lr)
    steps = [m.step for m in client.get_metric_history(sft_run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == int(sft_run.data.params["max_steps"])
    assert "eval/answer_exact_match" in sft_run.data.metrics and "eval_before/answer_exact_match" in sft_run.data.metrics
    assert 0.0 <= sft_run.data.metrics["harness/minimind_demo_facts/acc"] <= 1.0  # the pipeline's harness step, on the version
    assert parent.data.metrics["sft/harness/minimind_demo_facts/acc"] == sft_run.data.metrics["harness/minimind_demo_facts/acc"]
    assert {"loss_curve.png", "samples.json"} <= {a.path for a in client.list_artifacts(sft_run.info.run_id)}
    assert {"data/report.json", "data/report.png"} <= {a.path for a in client.list_artifacts(sft_run.info.run_id, "data")}
    assert sft_run.data.metrics["data/rows"] > 0 and "data/duplicate_rate" in sft_run.data.metrics
    assert sft_run.data.tags["data.prepared"]
    datasets = {(d.dataset.name, d.tags[0].value) for d in sft_run.inputs.dataset_inputs}
    assert datasets == {("sft.jsonl", "training"), ("sft_eval.jsonl", "evaluation")}
    assert any(key.startswith("system/") for key in sft_run.data.metrics)
    sft_head, pretrain_head = (load_model(by_stage[stage].model_dir).lm_head.weight for stage in ("sft", "pretrain"))
    assert not torch.equal(sft_head, pretrain_head)
    assert client.get_metric_history(by_stage["dpo"].run_id, "rewards/accuracies") and "eval/preference_accuracy" in dpo.after
    assert "eval/reasoning_format" in by_stage["reason"].after and "eval/answer_exact_match" in by_stage["reason"].after

    # The clip stage: the tower folder is cached per seed and settings, so the same settings again reuse it
    # and register it as the next version.
    from minimind import tracking
    from minimind.driver.clip_runner import train_clip
    from minimind.model.vision import load_vision_tower

    clip_stage = by_stage["clip"]
    assert clip_stage.model_dir.name.startswith("clip-demo-") and clip_stage.model_dir.parent.name.startswith("seed0-")
    assert set(clip_stage.after) == {"eval/image_to_caption_top1", "eval/image_to_caption_top5", "eval/chance"}
    assert clip_stage.after["eval/chance"] == pytest.approx(1 / 8)  # --eval-limit 8 held-out pairs, 8 distinct captions
    clip_run = client.get_run(clip_stage.run_id)
    assert clip_run.data.tags["clip.reused"] == "false" and "eval_before/image_to_caption_top1" in clip_run.data.metrics
    clip_config = next(config for name, config, _ in pipeline.STAGES if name == "clip")
    pipeline_settings = replace(clip_config, eval_limit=8, max_steps=max(2, int(clip_config.max_steps * 0.03)))
    again = train_clip(pipeline_settings)
    assert again.model_uri == "models:/minimind-clip-demo/2" and again.model_dir == clip_stage.model_dir
    assert client.get_run(again.run_id).data.tags["clip.reused"] == "true" and again.after == clip_stage.after
    tower, _ = load_vision_tower(tracking.resolve_model(again.model_uri, home / "download"))
    assert tower.config.hidden_size == 128 and tower.config.image_size == 64

    # White-box KD on the teacher's soft labels, from the pipeline's DPO model with its SFT model as teacher.
    from minimind.driver.runner import run_stage
    from minimind.training.configs import DistillConfig

    quick = dict(max_steps=4, checkpoint_every=2, log_every=1, eval_limit=4, batch_size=4, seq_len=128)
    kd = run_stage(DistillConfig(**quick, mode="kd", init="models:/minimind-dpo/1", teacher="models:/minimind-sft/1"), "kd")
    assert kd.model_uri == "models:/minimind-reason/2"
    assert client.get_metric_history(kd.run_id, "loss/kd") and client.get_metric_history(kd.run_id, "loss/ce")

    # GRPO with tools (`jobs/grpo.py --tools demo`), from the pipeline's tool-calling model: its rollouts run the
    # demo's tools between turns, both rewards are logged, and it is scored on the held-out tool use.
    from minimind.driver.runner import main

    grpo = main("grpo", ["--tools", "demo", "--max-steps", "2", "--batch-size", "2", "--group-size", "2",
                         "--max-new-tokens", "24", "--eval-limit", "4", "--log-every", "1", "--checkpoint-every", "2"])
    assert grpo.model_uri == "models:/minimind-grpo-tools/1"
    grpo_run = client.get_run(grpo.run_id)
    assert grpo_run.data.tags["source.name"] == "minimind-tools" and grpo_run.data.params["seq_len"] == "512"
    assert {"reward/call/mean", "reward/reply/mean"} <= set(grpo_run.data.metrics)
    assert {"eval/tool_call_accuracy", "eval/no_call_accuracy", "eval/tool_answer_accuracy"} <= set(grpo.after)
