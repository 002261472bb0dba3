"""A real Ray Train LoRA job: adapters-only checkpoints and versions that name their base, an exact resume,
--merge, and a registered adapter version that loads as its merged model (Serve and MLflow pyfunc)."""

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import mlflow_client as client
from safetensors.torch import load_file

from minimind import tracking
from minimind.driver.runner import run_stage
from minimind.model.checkpoint import load_model
from minimind.model.lora import LoRAConfig, load_adapter
from minimind.training.configs import PretrainConfig, SFTConfig, VLMConfig

QUICK = dict(max_steps=4, checkpoint_every=2, log_every=1, eval_limit=4, batch_size=4, seq_len=128, preset="tiny")
LORA = dict(QUICK, lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,ffn")
IDS = torch.arange(3, 40).reshape(1, -1)


def test_a_lora_job_trains_adapters_that_name_their_base_resumes_exactly_and_merges(mlflow_store, tmp_path, fast_train_polls):
    base = run_stage(PretrainConfig(**QUICK), "pretrain")
    straight = run_stage(SFTConfig(**LORA), "sft")

    # the registered version: adapters only, naming the exact base version
    assert straight.model_uri == "models:/minimind-sft/1"
    assert client().get_model_version("minimind-sft", "1").tags["lora.base"] == "models:/minimind-pretrain/1"
    assert LoRAConfig.load(straight.model_dir / "adapter_config.json").base == "models:/minimind-pretrain/1"
    assert not (straight.model_dir / "model.safetensors").exists()
    adapters = load_file(str(straight.model_dir / "adapter.safetensors"))
    assert adapters and all(".lora_A" in name or ".lora_B" in name for name in adapters)
    assert not any(".k_proj." in name or ".o_proj." in name for name in adapters)  # --lora-targets
    run = client().get_run(client().get_model_version("minimind-sft", "1").run_id)
    assert run.data.metrics["model/trainable_parameters"] == sum(t.numel() for t in adapters.values())

    # what trained is the adapters: with them taken off, the model is the base, bit for bit
    adapted = load_adapter(load_model(base.model_dir), straight.model_dir)
    base_state = load_model(base.model_dir).state_dict()
    assert all(torch.equal(adapted.state_dict()[name], tensor) for name, tensor in base_state.items())
    assert not torch.equal(adapted(IDS).logits, load_model(base.model_dir)(IDS).logits)

    # the version resolves (for Serve, the next stage's --init, `minimind chat`) to the merged model
    resolved = tracking.resolve_model("models:/minimind-sft/1", tmp_path / "resolved")
    assert (resolved / "model.safetensors").is_file()
    assert (load_model(resolved)(IDS).logits - adapted(IDS).logits).abs().max() <= 1e-5
    reply = mlflow.pyfunc.load_model("models:/minimind-sft/1").predict({"messages": [{"role": "user", "content": "你好"}]})
    assert isinstance(reply[0], str)

    # stopped halfway, then resumed: the same adapters as the uninterrupted run; --merge registers a plain model
    storage = str(tmp_path / "ray")
    stopped = run_stage(SFTConfig(**LORA, stop_after=2, storage_path=storage), "sft")
    assert stopped.model_uri == ""
    (run_dir,) = Path(storage).glob("sft-*")
    assert all(not (path / "model.safetensors").exists() for path in run_dir.glob("checkpoint_*"))  # adapter checkpoints
    resumed = run_stage(SFTConfig(**LORA, resume=True, merge=True, storage_path=storage), "sft")
    resumed_run = client().get_model_version("minimind-sft", resumed.model_uri.rsplit("/", 1)[1]).run_id
    assert [m.step for m in client().get_metric_history(resumed_run, "train/loss")] == [3, 4]
    merged = load_model(resumed.model_dir).state_dict()
    assert all(torch.equal(merged[name], tensor) for name, tensor in load_model(resolved).state_dict().items())


def test_lora_flags_that_cannot_work_are_refused_before_anything_runs(mlflow_store):
    with pytest.raises(SystemExit, match="pretraining from scratch"):
        run_stage(PretrainConfig(**LORA), "pretrain")
    with pytest.raises(SystemExit, match="text stages"):
        run_stage(VLMConfig(**LORA), "vlm_pretrain")
    with pytest.raises(SystemExit, match="--merge: LoRA settings, which need --lora-rank"):
        run_stage(SFTConfig(**QUICK, merge=True), "sft")
    with pytest.raises(SystemExit, match="unknown LoRA target 'lm_head'"):
        run_stage(SFTConfig(**{**LORA, "lora_targets": "lm_head"}), "sft")
    with pytest.raises(SystemExit, match="--lora-alpha must be positive"):  # every case: tests/test_runner.py
        run_stage(SFTConfig(**{**LORA, "lora_alpha": 0.0}), "sft")
