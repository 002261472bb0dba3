"""Training-step throughput: forward + backward + AdamW, ours vs transformers' Llama of the same shape.

    python bench/train.py                                   # minimind2-small, bf16 and fp32, batch 8 x 256
    python bench/train.py --presets tiny minimind2-small minimind2-moe --compile

Both models start from the same weights and run the same loss and optimizer; rounds alternate between
them so drift of the machine hits both alike. Each row reports the median over rounds (of each round's
median step) and, against the transformers baseline, the median of the per-round ratios with their
spread (min-max over rounds). MFU = model FLOPs/s (6N per token plus attention) over the device's dense
bf16 datasheet peak for known GPUs, else the peak square-matmul throughput measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    autocast,
    device_name,
    hf_llama_twin,
    median,
    peak_matmul_flops,
    print_table,
    time_calls,
    write_results,
)
from minimind.model.config import ModelConfig  # noqa: E402
from minimind.model.model import MiniMindForCausalLM  # noqa: E402


def flops_per_token(model: MiniMindForCausalLM, seq_len: int) -> float:
    config = model.config
    return 6 * model.num_parameters(active=True) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def make_step(model, optimizer, input_ids, device, dtype):
    """One optimizer step, each model through its own training path: `model(input_ids, labels=...).loss`
    (ours: chunked head + cross-entropy; transformers: full fp32 logits, then cross-entropy)."""

    def step():
        with autocast(device, dtype):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["minimind2-small"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = args.device
    peaks = {name: peak_matmul_flops(device, dt) for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(
        f"device: {device_name(device)}; MFU roof: bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s"
    )
    rows = []
    for preset in args.presets:
        config = ModelConfig.from_name(preset)
        input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
        for dtype in args.dtypes:
            torch.manual_seed(0)
            ours = MiniMindForCausalLM(config).to(device)
            candidates = {"ours": ours}
            if args.compile:
                twin = MiniMindForCausalLM(config).to(device)
                twin.load_state_dict(ours.state_dict())
                candidates["ours+compile"] = torch.compile(twin)
            if not args.no_hf and not config.is_moe:
                hf = hf_llama_twin(config).to(device)
                hf.load_state_dict(ours.state_dict(), strict=False)
                candidates["hf-llama"] = hf
            steps = {
                name: make_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), input_ids, device, dtype)
                for name, model in candidates.items()
            }
            round_seconds = {name: [] for name in candidates}  # each round's median step
            for round_index in range(args.rounds):
                for name, step in steps.items():
                    warmup = (3 if "compile" in name else 1) if round_index == 0 else 0
                    round_seconds[name].append(median(time_calls(step, device, warmup=warmup, repeats=args.steps)))
            tokens = args.batch_size * args.seq_len
            for name, values in round_seconds.items():
                rate = tokens / median(values)
                ratios = [hf / ours for ours, hf in zip(values, round_seconds["hf-llama"])] if "hf-llama" in round_seconds else []
                rows.append(
                    {
                        "preset": preset,
                        "model": name,
                        "dtype": dtype,
                        "ms/step": f"{median(values) * 1000:.0f}",
                        "tokens/s": f"{rate:.0f}",
                        "MFU": f"{flops_per_token(ours, args.seq_len) * rate / peaks[dtype]:.1%}",
                        "vs hf (median of rounds)": f"{median(ratios):.2f}x" if ratios else "",
                        "spread over rounds": f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "",
                    }
                )
            print_table(rows[-len(round_seconds) :], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    path = write_results("train", {"device": device_name(device), "args": vars(args), "peak_flops": peaks, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
