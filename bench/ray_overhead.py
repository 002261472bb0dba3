"""Ray Train overhead: the same training steps inside TorchTrainer and in a bare PyTorch loop.

    python bench/ray_overhead.py                      # demo preset on the demo world, 80 steps
    python bench/ray_overhead.py --steps 200 --warmup 40

Steady state compares tokens/s after the warm-up steps: inside Ray from the loop's own `train/tokens_per_s`
metrics (MLflow), bare from the same batches through the same `Stage.loss`, optimiser and autocast, on the
same number of threads. Start-up is the wall time of the whole job minus its training steps. Writes to a
throwaway MLflow store and checkpoint folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_table, write_results  # noqa: E402


def bare_tokens_per_s(steps: int, warmup: int, config) -> float:
    from minimind.data.rows import LengthGroupedBatches, StageData, collate, load_stage_dataset, row_lengths
    from minimind.demo import demo_data, demo_tokenizer
    from minimind.driver.stages import STAGES
    from minimind.model.config import ModelConfig
    from minimind.model.model import MiniMindForCausalLM
    from minimind.model.tokenizer import load_tokenizer
    from minimind.training.loop import batch_tokens

    threads = int(config.cpus_per_worker) or os.cpu_count()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(demo_tokenizer())
    torch.manual_seed(config.seed)
    model = MiniMindForCausalLM(ModelConfig.from_name(config.preset, vocab_size=len(tokenizer))).train()
    dataset = load_stage_dataset(demo_data()["pretrain"], tokenizer, StageData("pretrain", seq_len=config.seq_len))
    sampler = LengthGroupedBatches(row_lengths(dataset), config.batch_size, seed=config.seed)

    def epochs():
        for epoch in range(10**6):
            sampler.set_epoch(epoch)
            yield from sampler

    batches = epochs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    stage, tokens, started = STAGES["pretrain"], 0, 0.0
    for step in range(steps):
        if step == warmup:
            tokens, started = 0, time.perf_counter()
        batch = collate([dataset[i] for i in next(batches)], tokenizer.pad_token_id)
        tokens += batch_tokens(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = stage.loss(model, batch, {}, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="minimind-overhead-")
    os.environ.update(MINIMIND_HOME=home, MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db", RAY_USAGE_STATS_ENABLED="0")

    from mlflow.tracking import MlflowClient

    from minimind.driver.runner import run_stage
    from minimind.training.configs import PretrainConfig

    config = PretrainConfig(max_steps=args.steps, log_every=1, checkpoint_every=args.steps, eval_limit=1, warmup_steps=0)
    started = time.perf_counter()
    result = run_stage(config, "pretrain")
    job_seconds = time.perf_counter() - started
    client = MlflowClient()
    run_id = client.get_model_version("minimind-pretrain", result.model_uri.rsplit("/", 1)[1]).run_id
    history = sorted(client.get_metric_history(run_id, "train/tokens_per_s"), key=lambda m: m.step)
    steady = [m.value for m in history if m.step > args.warmup]
    ray_rate = len(steady) / sum(1 / value for value in steady)  # harmonic mean: equal tokens per step
    config.cpus_per_worker = int(client.get_run(run_id).data.params["cpus_per_worker"])
    bare_rate = bare_tokens_per_s(args.steps, args.warmup, config)
    tokens_per_step = config.batch_size * config.seq_len
    train_seconds = sum(tokens_per_step / m.value for m in history)
    rows = [
        {"loop": "bare PyTorch", "steady tokens/s": f"{bare_rate:,.0f}", "overhead": ""},
        {"loop": "inside TorchTrainer", "steady tokens/s": f"{ray_rate:,.0f}", "overhead": f"{bare_rate / ray_rate - 1:+.1%}"},
    ]
    print_table(rows, list(rows[0]))
    print(f"job wall time {job_seconds:.0f}s, of which ~{train_seconds:.0f}s training steps: start-up, evaluation and "
          f"registration ~{job_seconds - train_seconds:.0f}s")
    write_results("ray_overhead", {"args": vars(args), "bare_tokens_per_s": bare_rate, "ray_tokens_per_s": ray_rate,
                                   "job_seconds": job_seconds, "train_seconds": train_seconds})


if __name__ == "__main__":
    main()
