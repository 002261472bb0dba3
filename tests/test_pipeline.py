"""The README's first command, shortened: the whole text pipeline on the demo world, every stage a real
Ray Train run registered in MLflow, and every stage's held-out metric better after it than before."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import pipeline  # noqa: E402


@pytest.fixture
def home(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def test_pipeline_runs_every_stage_and_each_improves_its_heldout_metric(home, capsys):
    results = pipeline.main(["--scale", "0.03", "--eval-limit", "8", "--report", str(home / "docs" / "results.md")])
    by_stage = {result.stage: result for result in results}
    assert list(by_stage) == ["pretrain", "sft", "dpo", "reason", "clip", "vlm_pretrain", "vlm_sft"]
    assert [result.model_uri for result in results] == [
        "models:/minimind-pretrain/1", "models:/minimind-sft/1", "models:/minimind-dpo/1", "models:/minimind-reason/1",
        "models:/minimind-clip-demo/1", "models:/minimind-vlm-pretrain/1", "models:/minimind-vlm-sft/1",
    ]
    for stage in ("pretrain", "sft", "reason", "vlm_pretrain", "vlm_sft"):
        assert by_stage[stage].after["eval/heldout_loss"] < by_stage[stage].before["eval/heldout_loss"], stage
    dpo = by_stage["dpo"]
    assert dpo.before["eval/rewards_margin"] == 0.0  # the policy starts as its own reference
    assert dpo.after["eval/rewards_margin"] > 0.0  # the chosen replies gained on the rejected ones (6 steps at lr 3e-5: no more)

    printed = capsys.readouterr().out
    assert "whole pipeline:" in printed and "training results:" in printed and "describing 200 held-out pictures" in printed
    for stage in by_stage:
        assert f"\n{stage} " in printed  # rows of the summary table per stage
    assert "answer_exact_match/held_out_phrasing" in printed and "reasoning_accuracy/addition" in printed
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

    # One MLflow parent run groups the stage runs and holds the side-by-side answers and the pictures' report.
    import mlflow

    runs = mlflow.search_runs(experiment_names=["minimind"], output_format="list")
    parents = [run for run in runs if run.info.run_name.startswith("pipeline-")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["seed"] == "0" and parent.data.params["seed"] == "0"
    assert [artifact.path for artifact in mlflow.MlflowClient().list_artifacts(parent.info.run_id) if artifact.path == "results.md"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["stage"] for run in children) == sorted(by_stage)
    table = mlflow.load_table("training_results.json", run_ids=[parent.info.run_id])
    assert {"task", "prompt", "pretrain", "sft", "dpo", "reason", "reference"} <= set(table.columns) and len(table) == 5
    # at 3% of the steps a model may well answer nothing: the pictures' report is checked for being there, not for its values
    assert 0.0 <= parent.data.metrics["vlm_sft/hallucination_rate"] <= 1.0 and parent.data.metrics["vlm_pretrain/mean_reply_chars"] >= 0
