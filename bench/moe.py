"""The price of experts: a training step of a 4-expert top-1 MoE vs the dense model with the same
active parameters (every expert as wide as the dense FFN), bf16 autocast, same batch.

    python bench/moe.py                        # minimind2-small's shape, batch 8 x 256
    python bench/moe.py --experts 4 8 --top-k 1 2

MiniMind's own MoE loops over experts per token group in Python and runs about 1.5x the dense step;
ours dispatches tokens grouped by expert. Target: <= 1.3x dense at 4 experts top-1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import autocast, median, print_table, time_calls, write_results  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--experts", type=int, nargs="+", default=[4])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from minimind.model.config import ModelConfig
    from minimind.model.model import MiniMindForCausalLM

    layouts = {"dense": {}}
    for experts in args.experts:
        for top_k in args.top_k:
            layouts[f"{experts} experts top-{top_k}"] = {"num_experts": experts, "num_experts_per_tok": top_k}
    input_ids = torch.randint(0, 6400, (args.batch_size, args.seq_len))
    steps, models = {}, {}
    for name, layout in layouts.items():
        torch.manual_seed(0)
        model = MiniMindForCausalLM(ModelConfig.from_name(args.preset, **layout))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, optimizer=optimizer):
            with autocast("cpu", "bf16"):
                loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name], models[name] = step, model
    seconds = {name: [] for name in steps}
    for round_index in range(args.rounds):  # alternate so drift of the machine hits every layout alike
        for name, step in steps.items():
            seconds[name] += time_calls(step, "cpu", warmup=1 if round_index == 0 else 0, repeats=args.steps)
    dense = median(seconds["dense"])
    rows = [{"layout": name, "total params": f"{models[name].num_parameters() / 1e6:.1f}M",
             "active params": f"{models[name].num_parameters(active=True) / 1e6:.1f}M", "ms/step": f"{median(values) * 1000:.0f}",
             "vs dense": f"{median(values) / dense:.2f}x"} for name, values in seconds.items()]
    print_table(rows, list(rows[0]))
    print(f"wrote {write_results('moe', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
