"""Serving throughput and latency: N concurrent streaming clients against the real Ray Serve app on
loopback, with in-replica batching and without it (max batch size 1).

    python bench/serve.py                                  # demo-sized model, 1 and 16 clients, 64 tokens each
    python bench/serve.py --model models:/minimind-reason/latest --clients 1 4 16 --max-tokens 128
    python bench/serve.py --engine vllm --preset minimind2-small     # the same clients against vLLM (GPU, ray[llm])

Reports total tokens/s, p50/p99 time to first token and inter-token latency per setting. The default
model is a random demo-preset model whose special tokens never win, so every reply is exactly
--max-tokens long (a trained model's replies end whenever it says so, which blurs the comparison).
Bounded: each setting sends --clients requests once, each capped at --max-tokens, with a --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_table, write_results  # noqa: E402


def random_demo_model(directory: Path, preset: str = "demo") -> str:
    import torch

    from minimind.demo import demo_tokenizer
    from minimind.model.checkpoint import save_model
    from minimind.model.config import ModelConfig
    from minimind.model.model import MiniMindForCausalLM
    from minimind.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_name(preset, vocab_size=len(tokenizer)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0, 0.2)
        model.model.embed_tokens.weight[:8] = 0  # special tokens never win: every reply runs to max_tokens
    save_model(model, directory, tokenizer=tokenizer)
    return str(directory)


def start_local_serve(num_cpus: float) -> str:
    """A local Ray with room for one model replica of `num_cpus` and the gateway; Serve on a free loopback port."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=int(num_cpus) + 1, include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


NON_EMPTY_CONTENT = re.compile(rb'"content": ?"[^"]')  # ours writes ": ", vLLM ":"


def one_client(url: str, max_tokens: int, prompt: str, timeout: float) -> dict:
    body = json.dumps({"model": "minimind", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    arrivals, tokens = [], 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            if NON_EMPTY_CONTENT.search(line):
                arrivals.append(time.perf_counter())
            if b'"completion_tokens"' in line:  # the usage chunk (vLLM also sends "usage": null before it)
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return {"started": started, "arrivals": arrivals, "tokens": tokens, "ended": time.perf_counter()}


def quantile(values: list[float], q: int) -> float:
    """The q-th percentile (the only value when there is one, nan when there is none)."""
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def run_setting(base: str, clients: int, max_tokens: int, timeout: float) -> dict:
    url = base + "/v1/chat/completions"
    results, errors = [None] * clients, []

    def work(index):
        try:
            results[index] = one_client(url, max_tokens, f"第{index}个问题：请讲一个故事。", timeout)
        except Exception as error:  # noqa: BLE001
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    wall = time.perf_counter() - started
    done = [r for r in results if r]
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["arrivals"][0] - r["started"] for r in done if r["arrivals"]]
    gaps = [b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {
        "clients": clients,
        "ok": len(done),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
        "ttft_p99_ms": round(1000 * quantile(ttft, 99), 1) if ttft else None,
        "itl_p50_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "itl_p99_ms": round(1000 * quantile(gaps, 99), 1) if gaps else None,
    }


def bench_vllm(args) -> None:
    """The same clients against vLLM replicas; where there is no GPU or no vLLM, says so and records why."""
    import importlib.util

    import torch

    missing = ("no CUDA GPU" if not torch.cuda.is_available() else
               "vLLM is not installed (pip install 'ray[llm]')" if importlib.util.find_spec("vllm") is None else None)
    if missing:
        print(f"bench/serve.py --engine vllm: skipped: {missing}")
        write_results("serve_vllm", {"skipped": missing})
        return
    import ray
    from ray import serve

    from minimind.serve.vllm_app import build_vllm_app, llm_config, stage_hf_folder

    work = Path(tempfile.mkdtemp(prefix="bench-serve-vllm-"))
    model = args.model or random_demo_model(work / "model", args.preset)
    base = start_local_serve(args.num_cpus)
    rows = []
    try:
        serve.run(build_vllm_app([llm_config("minimind", stage_hf_folder(model, str(work / "storage")))]), name="bench",
                  route_prefix="/")
        run_setting(base, 1, 8, args.timeout)  # warm-up
        for clients in args.clients:
            rows.append({"engine": "vllm", **run_setting(base, clients, args.max_tokens, args.timeout)})
            print_table(rows[-1:], list(rows[-1]))
    finally:
        serve.shutdown()
        ray.shutdown()
    path = write_results("serve_vllm", {"model": model, "preset": args.preset, "max_tokens": args.max_tokens, "rows": rows})
    print(f"results: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI or directory (default: a random model of --preset)")
    parser.add_argument("--preset", default="demo", help="shape of the default random model (the demo tokenizer's vocabulary)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs of the replica (default: 1 where there is one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count()), help="CPUs (torch threads) of the replica")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1], help="max batch sizes to compare (1: no batching)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--engine", choices=["minimind", "vllm"], default="minimind",
                        help="vllm: the model exported to Hugging Face format in vLLM through Ray Serve LLM (needs a GPU)")
    args = parser.parse_args(argv)
    if args.engine == "vllm":
        return bench_vllm(args)

    import ray
    import torch
    from ray import serve

    from minimind.serve.app import ModelSpec, ServeSettings, build
    from minimind.serve.protocol import Limits

    model = args.model or random_demo_model(Path(tempfile.mkdtemp(prefix="bench-serve-")) / "model", args.preset)
    num_gpus = args.num_gpus if args.num_gpus is not None else float(torch.cuda.is_available())
    base = start_local_serve(args.num_cpus)
    rows = []
    try:
        for batch_size in args.batch_sizes:
            spec = ModelSpec(
                "minimind", model, num_cpus=args.num_cpus, num_gpus=num_gpus, max_batch_size=batch_size, batch_wait_ms=10
            )
            serve.run(
                build(ServeSettings(models=[spec], limits=Limits(max_tokens=max(args.max_tokens, 512)))),
                name="bench",
                route_prefix="/",
            )
            run_setting(base, 1, 8, args.timeout)  # warm-up
            for clients in args.clients:
                row = {"max_batch": batch_size, **run_setting(base, clients, args.max_tokens, args.timeout)}
                rows.append(row)
                print_table([row], list(row))
    finally:
        serve.shutdown()
        ray.shutdown()
    single = {r["max_batch"]: r["tokens_per_s"] for r in rows if r["clients"] == 1}
    for row in rows:
        row["x_single_client"] = (
            round(row["tokens_per_s"] / single[row["max_batch"]], 2) if single.get(row["max_batch"]) else None
        )
    print()
    print_table(
        rows,
        [
            "max_batch",
            "clients",
            "ok",
            "errors",
            "wall_s",
            "tokens",
            "tokens_per_s",
            "x_single_client",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "itl_p50_ms",
            "itl_p99_ms",
        ],
    )
    print("(tokens from each reply's usage; latencies between streamed text deltas)")
    path = write_results(
        "serve",
        {
            "model": model,
            "preset": args.preset if not args.model else None,
            "num_gpus": num_gpus,
            "max_tokens": args.max_tokens,
            "rows": rows,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
