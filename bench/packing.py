"""Useful tokens/s on the demo world's SFT length distribution: our length-grouped batches padded to
the longest row of each batch vs naive batches in data order padded to --seq-len, same model, same loss,
same optimiser, bf16 autocast. Useful = non-padding tokens.

    python bench/packing.py                          # minimind2-small, batch 16, seq_len 512
    python bench/packing.py --preset demo --steps 20

Prints the length distribution and the table; writes bench/results/packing-*.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import autocast, print_table, write_results  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode (after 2 warm-up steps)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)

    from minimind.data.rows import LengthGroupedBatches, StageData, collate, load_stage_dataset, row_lengths
    from minimind.demo import demo_data, demo_tokenizer
    from minimind.model.config import ModelConfig
    from minimind.model.model import MiniMindForCausalLM
    from minimind.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    rows = load_stage_dataset(demo_data()["sft"], tokenizer, StageData("sft", seq_len=args.seq_len))
    lengths = row_lengths(rows)
    quartiles = statistics.quantiles(lengths, n=4)
    print(f"{len(rows)} SFT rows, tokens per row: min {min(lengths)}, quartiles {quartiles}, max {max(lengths)}")
    config = ModelConfig.from_name(args.preset, vocab_size=len(tokenizer))
    grouped = list(LengthGroupedBatches(lengths, args.batch_size, seed=0))
    naive = [list(range(i, i + args.batch_size)) for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]

    def pad_to_seq_len(batch):
        width = args.seq_len - batch["input_ids"].shape[1]
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width), value=value)  # noqa: E731
        return {"input_ids": pad(batch["input_ids"], tokenizer.pad_token_id), "labels": pad(batch["labels"], -100),
                "attention_mask": pad(batch["attention_mask"], 0)}

    modes = {
        "length-grouped, padded to batch max": (grouped, lambda b: b),
        f"naive, padded to {args.seq_len}": (naive, pad_to_seq_len),
    }
    results = []
    for name, (batches, shape) in modes.items():
        torch.manual_seed(0)
        model = MiniMindForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        useful = computed = 0
        seconds = 0.0
        for index, rows_index in enumerate(batches[: args.steps + 2]):
            batch = shape(collate([rows[i] for i in rows_index], tokenizer.pad_token_id))
            started = time.perf_counter()
            with autocast("cpu", args.dtype):
                loss = model(batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index >= 2:
                seconds += time.perf_counter() - started
                useful += int(batch["attention_mask"].sum())
                computed += batch["input_ids"].numel()
        results.append(
            {
                "batches": name,
                "useful tokens/s": round(useful / seconds),
                "computed tokens/s": round(computed / seconds),
                "padding": f"{1 - useful / computed:.0%}",
            }
        )
    results[0]["vs naive"] = f"{results[0]['useful tokens/s'] / results[1]['useful tokens/s']:.2f}x"
    print_table(results, ["batches", "useful tokens/s", "computed tokens/s", "padding", "vs naive"])
    path = write_results(
        "packing", {"args": vars(args), "lengths": {"quartiles": quartiles, "max": max(lengths)}, "rows": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
