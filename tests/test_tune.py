"""Both Ray Tune sweeps for real, two tiny trials each: trials nest under one MLflow parent run with
their swept settings, the pick is registered with alias `best`, and ASHA gets the metric it stops on."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tune"))

import dpo_beta  # noqa: E402
import grpo as grpo_sweep  # noqa: E402
import moe_experts  # noqa: E402
from conftest import mlflow_client as client  # noqa: E402


def children(parent_run_id):
    parent = client().get_run(parent_run_id)
    return client().search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_moe_sweep_nests_trials_ranks_them_and_registers_the_best(mlflow_store, capsys):
    model_uri, rows = moe_experts.main(
        [
            "--experts",
            "1",
            "2",
            "--top-k",
            "1",
            "--shared",
            "0",
            "--preset",
            "tiny",
            "--steps",
            "4",
            "--reports",
            "2",
            "--name",
            "moe-test",
        ]
    )
    assert model_uri == "models:/minimind-moe/1"
    best = client().get_model_version_by_alias("minimind-moe", "best")
    assert str(best.version) == "1"
    parent_run_id = client().get_run(best.run_id).data.tags["mlflow.parentRunId"]
    runs = children(parent_run_id)
    assert sorted(run.data.params["config_overrides"] for run in runs) == [
        "num_experts=1,num_experts_per_tok=1,num_shared_experts=0",
        "num_experts=2,num_experts_per_tok=1,num_shared_experts=0",
    ]
    # each swept value is a param of its own, as MLflow's compare and parallel-coordinates views need
    assert sorted(
        (r.data.params["num_experts"], r.data.params["num_experts_per_tok"], r.data.params["num_shared_experts"]) for r in runs
    ) == [("1", "1", "0"), ("2", "1", "0")]
    # the best is registered from the trial's LoggedModel in MLflow, not from a folder on the trial's node
    assert best.source == f"models:/{client().get_run(best.run_id).data.tags['model_id']}"
    for run in runs:  # what the table compares: size, speed and held-out loss, per trial
        assert {"model/parameters", "model/active_parameters", "train/tokens_per_s", "val/loss"} <= set(run.data.metrics)
        assert len(client().get_metric_history(run.info.run_id, "val/loss")) == 2  # the metric ASHA compares, every 2 steps
    two_experts = next(r for r in rows if r["num_experts"] == 2)
    assert two_experts["total_params"] > two_experts["active_params"]  # top-1 of 2 experts leaves one idle
    assert {"ranking.json", "comparison.png"} <= {a.path for a in client().list_artifacts(parent_run_id)}
    assert "best: models:/minimind-moe/1" in capsys.readouterr().out


def test_moe_sweep_stops_trials_with_asha_on_the_heldout_loss():
    from ray.tune.schedulers import ASHAScheduler

    scheduler, tune_config = moe_experts.scheduling(reports=6)
    assert isinstance(scheduler, ASHAScheduler) and tune_config == {"metric": "val/loss", "mode": "min", "scheduler": scheduler}


def test_dpo_beta_sweep_picks_by_the_stated_rule_and_registers_it(mlflow_store):
    from conftest import random_model

    from minimind.demo import demo_tokenizer
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer

    sft_dir = mlflow_store / "sft-model"
    save_model(random_model(vocab_size=2048, std=0.02), sft_dir, tokenizer=load_tokenizer(demo_tokenizer()))
    model_uri, rows = dpo_beta.main(
        ["--grid", "0.05", "0.5", "--init", str(sft_dir), "--steps", "4", "--eval-limit", "8", "--name", "dpo-test"]
    )
    assert sorted(row["beta"] for row in rows) == [0.05, 0.5]
    keepers = [row for row in rows if row["keeps_answers"]]
    assert keepers and model_uri == "models:/minimind-dpo/1"
    best = client().get_model_version_by_alias("minimind-dpo", "best")
    assert best.run_id == max(keepers, key=lambda r: (r["rewards_accuracy"], r["answer_exact_match"], -r["drift"]))["run_id"]
    for run in children(client().get_run(best.run_id).data.tags["mlflow.parentRunId"]):
        assert {"eval/rewards_accuracy", "eval/rewards_margin", "eval/drift", "eval/answer_exact_match"} <= set(run.data.metrics)


def test_grpo_sweep_crosses_group_sizes_with_kl_coefficients_and_registers_the_pick(mlflow_store):
    from conftest import random_model

    from minimind.demo import demo_tokenizer
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer

    start = mlflow_store / "reason-model"
    save_model(random_model(vocab_size=2048, std=0.02), start, tokenizer=load_tokenizer(demo_tokenizer()))
    model_uri, rows = grpo_sweep.main(
        [
            "--group-sizes",
            "2",
            "4",
            "--kl-coefs",
            "0.05",
            "--init",
            str(start),
            "--steps",
            "2",
            "--eval-limit",
            "4",
            "--name",
            "grpo-test",
        ]
    )
    assert sorted((row["group_size"], row["kl_coef"]) for row in rows) == [(2, 0.05), (4, 0.05)]
    assert model_uri == "models:/minimind-grpo/1" and all(row["status"] == "finished" for row in rows)
    best = client().get_model_version_by_alias("minimind-grpo", "best")
    assert best.run_id == rows[0]["run_id"]  # the ranking's first
    for run in children(client().get_run(best.run_id).data.tags["mlflow.parentRunId"]):
        assert {"eval/reasoning_accuracy", "eval/answer_exact_match", "reward/total/mean", "time/rollout_s"} <= set(
            run.data.metrics
        )
