"""The training loop as a GPU runs it, checked on CPU: no host synchronisation inside a step except at log
steps, DDP settings that need no buffer broadcast and no unused-parameter walk, and the MFU roof."""

import pytest
import torch
from conftest import random_model

from minimind.data.prepare import prepare
from minimind.data.rows import StageData
from minimind.driver.stages import STAGES
from minimind.model.checkpoint import save_model
from minimind.training.configs import DistillConfig, DPOConfig, SFTConfig
from minimind.training.loop import StageJob, train_loop_per_worker

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from minimind.demo import demo_data, demo_tokenizer
    from minimind.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    directory = tmp_path_factory.mktemp("model")
    save_model(random_model("tiny", vocab_size=len(tokenizer), std=0.02), directory, tokenizer=tokenizer)
    return str(directory), tokenizer, demo_data()


@pytest.mark.parametrize("stage, config", [
    ("sft", SFTConfig(batch_size=4, grad_accum=2, seq_len=256)),
    ("dpo", DPOConfig(batch_size=2, seq_len=256)),
    ("kd", DistillConfig(mode="kd", batch_size=4, seq_len=256)),
])
def test_a_training_step_reads_nothing_from_the_device_except_at_log_steps(
    ray_cluster, demo_model, tmp_path, monkeypatch, stage, config
):
    """Every Tensor.item/tolist/float/int/bool call is recorded (on a GPU each one waits for the device);
    steps 2-5 of 6 log nothing, report nothing and checkpoint nothing, so they must make none. (Waits
    inside torch's own kernels, such as boolean-mask indexing, are not visible from Python: the losses
    use mask weights instead.)"""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    import minimind.training.loop as train_module

    model_dir, tokenizer, paths = demo_model
    kind = "dpo" if stage == "dpo" else "sft"
    source = tmp_path / f"{kind}.jsonl"
    with open(paths[kind], encoding="utf-8") as file:
        source.write_text("".join(next(file) for _ in range(200)), encoding="utf-8")
    prepared = prepare(str(source), tokenizer, StageData(kind, seq_len=config.seq_len), str(tmp_path / "prepared"))
    config.max_steps, config.log_every, config.checkpoint_every, config.cpus_per_worker = 6, 1000, 1000, 1
    job = StageJob(STAGES[stage], config, init_dir=model_dir, data_path=prepared.location, teacher_dir=model_dir)

    events = []

    class FusedAdamW(torch.optim.AdamW):
        """AdamW as the loop makes it on CUDA (fused); on CPU it is foreach, which reads its step count with .item()."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "fused": True})

        def step(self, *args, **kwargs):
            events.append("step")
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    logger_log = train_module.MetricLogger.log
    monkeypatch.setattr(
        train_module.MetricLogger, "log", lambda self, step, *a: (events.append(f"log {step}"), logger_log(self, step, *a))[1]
    )
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _name=name, _original=original: (events.append(_name), _original(self, *a))[1]
        )

    TorchTrainer(train_loop_per_worker, train_loop_config={"job": job}, scaling_config=ScalingConfig(num_workers=0)).fit()
    monkeypatch.undo()

    assert events.count("step") == 6 and "log 1" in events and "log 6" in events
    after_first_log = events[events.index("log 1") + 1 :]
    before_last_step = after_first_log[
        : [i for i, e in enumerate(after_first_log) if e == "step"][4]
    ]  # steps 2..5 and step 6's micro-batches
    assert before_last_step.count("step") == 4
    assert [e for e in before_last_step if e in HOST_READS] == []
    assert any(e in HOST_READS for e in events[: events.index("log 1")])  # the recording works: the first log step reads


def _train_steps(rank: int, world: int, init_file: str, state: dict, config, batches: list, out: str) -> None:
    """`len(batches)` optimiser steps of the loop's accumulate_gradients on the SFT stage; with world > 1
    each rank takes its share of every batch under DDP, in two micro-batches."""
    from torch.nn.parallel import DistributedDataParallel

    from minimind.model.model import MiniMindForCausalLM
    from minimind.training.loop import accumulate_gradients, ddp_options

    torch.set_num_threads(1)
    model = MiniMindForCausalLM(config)
    model.load_state_dict(state)
    trained = model
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        trained = DistributedDataParallel(model, **ddp_options())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: a gradient that differs shows in the weights
    for ids, labels in batches:
        mine = {"input_ids": ids.chunk(world)[rank], "labels": labels.chunk(world)[rank]}
        micro = [{key: value.chunk(2)[half] for key, value in mine.items()} for half in range(2)] if world > 1 else [mine]
        accumulate_gradients(trained, STAGES["sft"], micro, {}, None, torch.device("cpu"), world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save(model.state_dict(), f"{out}.{rank}")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_two_ddp_workers_without_buffer_broadcast_match_one_worker_on_the_doubled_batch(tmp_path, preset):
    """ddp_options() and accumulate_gradients as the loop uses them (gloo, two processes, two micro-batches
    each). The dense model matches one process on the whole batch step for step, though the rows'
    supervised lengths differ (1 to 15 tokens: each rank and micro-batch holds a different count, which
    the all-reduced count of the step evens out); the MoE model (whose load-balancing loss is not a mean over rows)
    trains with an expert left idle, which DDP without find_unused_parameters would reject."""
    import torch.multiprocessing as mp

    model = random_model(preset, std=0.02, **({"num_experts_per_tok": 1} if preset == "tiny-moe" else {}))
    if model.config.is_moe:
        for block in model.model.layers:  # router logits (w.x, -w.x, 0, 0): experts 2 and 3 get no token in the first step
            block.mlp.gate.weight.data[1] = -block.mlp.gate.weight.data[0]
            block.mlp.gate.weight.data[2:] = 0.0
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batches = []
    for step in range(3):
        ids = torch.randint(3, 6400, (4, 16), generator=torch.Generator().manual_seed(step))
        prompt_lengths = torch.tensor([15, 12, 6, 1]).roll(step)[:, None]  # the labels start after each row's prompt
        batches.append((ids, ids.masked_fill(torch.arange(16)[None, :] < prompt_lengths, -100)))
    mp.spawn(_train_steps, args=(2, str(tmp_path / "init"), state, model.config, batches, str(tmp_path / "ddp")), nprocs=2)
    ranks = [torch.load(tmp_path / f"ddp.{rank}", weights_only=True) for rank in range(2)]
    single = tmp_path / "single"
    _train_steps(0, 1, "", state, model.config, batches, str(single))
    alone = torch.load(f"{single}.0", weights_only=True)
    for name, tensor in ranks[0].items():
        torch.testing.assert_close(tensor, ranks[1][name], rtol=0, atol=0)  # the ranks agree exactly
        assert not tensor.equal(state[name]) or ".experts." in name, name  # everything trained (idle experts may not)
        if not model.config.is_moe:
            torch.testing.assert_close(tensor, alone[name], rtol=1e-4, atol=2e-6)


def test_compiled_training_trains_and_checkpoints_under_the_same_names(ray_cluster, demo_model, tmp_path, monkeypatch):
    """--compile wraps the model's forward with torch.compile. Dynamo traces it for real here; its backend
    is "eager" (inductor's C++ build of every graph would take a minute of CI on 2 cores)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from minimind.training import stages

    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or real_compile(fn, backend="eager"))
    model_dir, tokenizer, paths = demo_model
    source = tmp_path / "pretrain.jsonl"
    with open(paths["pretrain"], encoding="utf-8") as file:
        source.write_text("".join(next(file) for _ in range(100)), encoding="utf-8")
    prepared = prepare(str(source), tokenizer, StageData("pretrain", seq_len=64), str(tmp_path / "prepared"))
    config = SFTConfig(batch_size=4, seq_len=64, max_steps=3, compile=True, cpus_per_worker=1)
    job = StageJob(STAGES["pretrain"], config, init_dir=model_dir, data_path=prepared.location)
    saved = []
    real_save = stages.save_model
    monkeypatch.setattr(
        stages,
        "save_model",
        lambda model, directory, **kw: saved.append(set(load_file(f"{real_save(model, directory, **kw)}/model.safetensors"))),
    )
    result = TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": job}, scaling_config=ScalingConfig(num_workers=0)
    ).fit()
    assert len(compiled) == 1
    assert result.metrics["step"] == 3 and 0 < result.metrics["train/loss"] < 20
    assert saved == [
        set(load_file(f"{model_dir}/model.safetensors"))
    ]  # the checkpoint's names as before: no "_orig_mod." prefixes


def test_mfu_divides_by_the_datasheet_peak_of_known_gpus_and_measures_the_rest():
    from minimind.training.flops import known_peak_flops, peak_flops

    assert known_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert known_peak_flops("NVIDIA H100 PCIe") == 756.5e12  # not the SXM number
    assert known_peak_flops("NVIDIA H200") == 989.4e12
    assert known_peak_flops("NVIDIA H20") == 148e12  # not the H200's
    assert known_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert known_peak_flops("NVIDIA A10G") == 70e12 and known_peak_flops("NVIDIA A10") == 125e12
    assert [known_peak_flops(f"NVIDIA {n}") for n in ("L4", "L40", "L40S")] == [121e12, 181.05e12, 362.05e12]
    assert known_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12  # fp32 accumulation: half the fp16-accumulate rate
    assert known_peak_flops("Tesla T4") is None
    flops, source = peak_flops("cpu", torch.bfloat16, size=256)
    assert flops > 1e9 and "measured bfloat16 matmul on cpu" in source


def _reasoning_rows(count: int) -> tuple[list[dict], object]:
    """Reasoning rows (and their tokenizer) whose supervised replies grow from a few tokens to dozens."""
    from minimind.data.rows import StageData, stage_rows
    from minimind.demo import demo_tokenizer
    from minimind.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    records = [
        {
            "conversations": [
                {"role": "user", "content": f"{n} 加 {n} 等于几？"},
                {"role": "assistant", "content": f"<think>{'想' * (n * n // 4)}</think><answer>{2 * n}</answer>"},
            ]
        }
        for n in range(count)
    ]
    stage = StageData("reason", seq_len=128)
    return stage_rows(records, stage, tokenizer, stage.marker_ids(tokenizer)), tokenizer


def _step_gradient(model, stage_name: str, batches: list[dict]) -> tuple[dict, dict]:

    from minimind.training.loop import accumulate_gradients

    model.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(model, STAGES[stage_name], batches, {}, None, torch.device("cpu"))
    return {name: p.grad.clone() for name, p in model.named_parameters()}, metrics


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch_with_uneven_supervised_lengths():
    """The reasoning stage, 16 rows whose supervised tokens range from 6 to 63: four micro-batches of
    four (as length-grouped batches fall: short rows together) give the gradient and the loss of one
    batch of sixteen, tag weights included. Dividing each micro-batch's mean by 4 would weigh a token
    of the first micro-batch about 8 times more than one of the last."""
    from minimind.data.rows import collate

    rows, tokenizer = _reasoning_rows(16)
    supervised = [sum(label != -100 for label in row["labels"]) for row in rows]
    assert sum(supervised[:4]) * 5 < sum(supervised[12:])  # really uneven
    model = random_model("tiny", vocab_size=len(tokenizer), std=0.02).train()
    whole, whole_metrics = _step_gradient(model, "reason", [collate(rows, tokenizer.pad_token_id)])
    accumulated, metrics = _step_gradient(
        model, "reason", [collate(rows[i : i + 4], tokenizer.pad_token_id) for i in range(0, 16, 4)]
    )
    for name, gradient in whole.items():
        torch.testing.assert_close(
            accumulated[name], gradient, rtol=1e-4, atol=1e-7, msg=lambda text, name=name: f"{name}: {text}"
        )
    torch.testing.assert_close(metrics["train/loss"], whole_metrics["train/loss"])  # the logged loss is the step's too


def test_dpo_steps_weigh_each_preference_pair_alike():

    batch = {"chosen_input_ids": torch.zeros(3, 7, dtype=torch.long), "rejected_input_ids": torch.zeros(3, 5, dtype=torch.long)}
    assert STAGES["dpo"].normalised_over == "preference pairs" and STAGES["dpo"].loss_count(batch) == 3
    assert STAGES["reason"].normalised_over == STAGES["kd"].normalised_over == "supervised tokens"
