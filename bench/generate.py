"""Decode and prefill throughput: ours (with and without KV cache) vs transformers' `generate` on the
same weights exported to LlamaForCausalLM.

    python bench/generate.py                       # minimind2-small, batch 1 and 16, all precisions
    python bench/generate.py --new-tokens 128 --batch-sizes 1 4 16 --precisions bf16

Precisions: fp32 (fp32 weights), bf16-autocast (fp32 weights under bf16 autocast), bf16 (weights cast
to bf16, as Serve and `minimind chat` keep them). Both implementations run each precision the same way.
Every run decodes exactly --new-tokens greedy tokens per sequence (no stop token), so rates compare like
with like; rounds alternate. At batch 1 decoding reads every weight once per token, so it is bound by
memory bandwidth: the run measures the bandwidth (a 1 GiB copy, read + write counted) and reports each
batch-1 decoding step as a fraction of that bound (weight bytes / bandwidth over the step's time), and every
rate against transformers' `generate` with fp32 weights, its default. "new tokens/s" and "ms/new token" are
whole calls (the prompt's prefill included); a decoding step is a whole call less a call for one new token
(its prefill and first token), over the steps in between.

Ours decodes as `minimind chat` and Serve do by default: on a CPU its one-row decoding step is compiled
(`--compile auto`, see minimind.inference.generate.compile_for_decoding), and then the eager step is timed
beside it. Inductor compiles into a new, empty cache directory, so the first call's time printed is the
compile a first-time user waits for (later processes read inductor's on-disk cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import autocast, device_name, median, memory_bandwidth, print_table, time_calls, write_results  # noqa: E402
from minimind.inference.generate import compile_for_decoding, compiled_step_for, generate, wants_compile  # noqa: E402
from minimind.inference.sampling import SamplingParams
from minimind.model.checkpoint import save_model  # noqa: E402
from minimind.model.config import ModelConfig  # noqa: E402
from minimind.model.hf import export_hf
from minimind.model.model import MiniMindForCausalLM  # noqa: E402

PRECISIONS = {"fp32": (torch.float32, "fp32"), "bf16-autocast": (torch.float32, "bf16"), "bf16": (torch.bfloat16, "fp32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-cache-max-batch", type=int, default=1, help="largest batch timed without KV cache (slow)")
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="compile ours' decoding step as `minimind chat` and Serve do (auto: on a CPU); eager is timed beside it",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")  # see the module's docstring

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.from_name(args.preset)
    model_fp32 = MiniMindForCausalLM(config).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model_fp32, Path(tmp) / "ours")
        export_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        hf_fp32 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").to(device).eval()
    bandwidth = memory_bandwidth(device)
    print(
        f"device: {device_name(device)}; {args.preset}: {model_fp32.num_parameters() / 1e6:.2f}M parameters; "
        f"memory bandwidth (1 GiB copy, read + write): {bandwidth / 1e9:.1f} GB/s"
    )

    rows, hf_fp32_rate, compile_seconds = [], {}, {}
    for precision in [p for p in PRECISIONS if p in args.precisions]:  # fp32 first: the others compare with it
        weights_dtype, dtype = PRECISIONS[precision]
        model, hf = (copy.deepcopy(m).to(weights_dtype) for m in (model_fp32, hf_fp32))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # read once per decoded token
        compiled = copy.deepcopy(model)
        if not (wants_compile(args.compile, device) and compile_for_decoding(compiled)):
            compiled = None
        for batch in args.batch_sizes:
            prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len)).tolist()
            def ours(decoder, use_cache=True):
                return lambda n: generate(decoder, prompts, SamplingParams(n, stop_token_ids=[], use_cache=use_cache))

            runs = {"ours (kv cache)": ours(model)}
            if compiled is not None and compiled_step_for(compiled, rows=batch) is not None:
                runs = {"ours (kv cache, compiled)": ours(compiled), "ours (kv cache, eager)": ours(model)}
                with autocast(device, dtype):
                    first_call = time_calls(lambda: runs["ours (kv cache, compiled)"](2), device, warmup=0, repeats=1)
                compile_seconds[precision] = first_call[0]
                print(f"{precision}: first compiled call (compile + two tokens) {compile_seconds[precision]:.1f} s")
            runs["hf generate"] = lambda n: hf_generate(hf, prompts, n, device)
            if batch <= args.no_cache_max_batch:
                runs["ours (no cache)"] = ours(model, use_cache=False)
            seconds = {name: [] for name in runs}  # whole calls: prefill + new_tokens steps
            step_seconds = {name: [] for name in runs}  # one decoding step: (whole call - a call for one token) / (n - 1)
            for round_index in range(args.rounds):
                for name, run in runs.items():
                    with autocast(device, dtype):
                        warmup = 1 if round_index == 0 else 0
                        whole = time_calls(lambda: run(args.new_tokens), device, warmup=warmup, repeats=1)[0]
                        first = time_calls(lambda: run(1), device, warmup=0, repeats=1)[0]
                    seconds[name].append(whole)
                    step_seconds[name].append((whole - first) / (args.new_tokens - 1))
            hf_rate = batch * args.new_tokens / median(seconds["hf generate"])
            if precision == "fp32":
                hf_fp32_rate[batch] = hf_rate
            bound_step = weight_bytes / bandwidth  # a step that only read the weights, at the copy's bandwidth
            for name, values in seconds.items():
                rate, step = batch * args.new_tokens / median(values), median(step_seconds[name])
                rows.append(
                    {
                        "precision": precision,
                        "batch": batch,
                        "decoder": name,
                        "new tokens/s": f"{rate:.0f}",
                        "ms/new token": f"{median(values) / args.new_tokens * 1000:.2f}",
                        "vs hf": f"{rate / hf_rate:.2f}x",
                        "vs hf fp32": f"{rate / hf_fp32_rate[batch]:.2f}x" if batch in hf_fp32_rate else "",
                        "decode step ms": f"{step * 1000:.2f}",
                        "of bandwidth bound": f"{bound_step / step:.0%}" if batch == 1 else "",
                    }
                )
            print_table(rows[-len(runs) :], list(rows[-1]))

    prefill_rows = []
    for precision in args.precisions:
        weights_dtype, dtype = PRECISIONS[precision]
        model, hf = (copy.deepcopy(m).to(weights_dtype) for m in (model_fp32, hf_fp32))
        prompt = torch.randint(3, config.vocab_size, (1, args.prefill_len), device=device)
        runs = {"ours": lambda: model(prompt, logits_to_keep=1), "hf": lambda: hf(prompt, logits_to_keep=1)}
        for name, run in runs.items():
            with torch.inference_mode(), autocast(device, dtype):
                rate = args.prefill_len / median(time_calls(run, device, warmup=1, repeats=args.rounds))
            prefill_rows.append(
                {"precision": precision, "model": name, "prefill tokens": args.prefill_len, "prefill tokens/s": f"{rate:.0f}"}
            )
    print()
    print_table(rows, list(rows[0]))
    print()
    print_table(prefill_rows, list(prefill_rows[0]))
    weights_mb = sum(p.numel() * p.element_size() for p in model_fp32.parameters()) / 2**20
    largest = max(args.batch_sizes)
    kv_mb = (
        2
        * config.num_hidden_layers
        * largest
        * config.num_key_value_heads
        * config.head_dim
        * (args.prompt_len + args.new_tokens)
        * 4
        / 2**20
    )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nmemory: weights {weights_mb:.0f} MB fp32; KV cache at batch {largest} fp32 {kv_mb:.1f} MB; "
        f"peak process RSS {peak_rss_mb:.0f} MB"
    )
    path = write_results(
        "generate",
        {
            "device": device_name(device),
            "args": vars(args),
            "memory_bandwidth_bytes_per_s": bandwidth,
            "rows": rows,
            "prefill": prefill_rows,
            "compile_seconds": compile_seconds,
            "memory_mb": {"weights": weights_mb, "kv_cache": kv_mb, "peak_rss": peak_rss_mb},
        },
    )
    print(f"wrote {path}")


@torch.inference_mode()
def hf_generate(hf, prompts, new_tokens: int, device: str):
    input_ids = torch.tensor(prompts, device=device)
    return hf.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


if __name__ == "__main__":
    main()
