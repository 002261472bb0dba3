"""What Ray Serve costs on top of the engine: the same clients against the same model, once driving the
engine in this process (`ChatModel.chat`, no HTTP, no Ray) and once through the Serve app on loopback
(proxy -> gateway -> model replica), in one run on one machine.

    python bench/serve_overhead.py                          # demo-sized random model, 16 and 64 clients
    python bench/serve_overhead.py --clients 16 64 --max-tokens 64 --rounds 2

Every client sends one streaming request for exactly --max-tokens tokens (a random model whose special
tokens never win), all at once; the replica batches up to --max-batch rows, so 64 clients queue. Both ways
build each request from the same JSON body (`parse_chat_body`), decode with the same ChatModel settings
and count the same tokens. Reports tokens/s, p50/p99 time to first token (the first text), and Serve's
tokens/s as a fraction of in-process. Rounds alternate between the two ways; figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_table, write_results  # noqa: E402
from bench.serve import quantile, random_demo_model, run_setting, start_local_serve  # noqa: E402


def body(index: int, max_tokens: int) -> bytes:
    """The request each client sends, both ways (bench.serve.one_client's, as JSON)."""
    return json.dumps({"model": "minimind", "messages": [{"role": "user", "content": f"第{index}个问题：请讲一个故事。"}],
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                       "temperature": 0}).encode()


def in_process(chat_model, clients: int, max_tokens: int) -> dict:
    from minimind.serve.protocol import Limits, parse_chat_body

    limits = Limits(max_tokens=max(max_tokens, 512))

    async def client(index: int) -> tuple[float, int]:
        request = parse_chat_body(body(index, max_tokens), {"minimind": False}, limits)
        started, first, tokens = time.perf_counter(), None, 0
        async for event in chat_model.chat(request):
            if event["type"] == "delta" and event["content"] and first is None:
                first = time.perf_counter() - started
            elif event["type"] == "end":
                tokens = event["completion_tokens"]
        return first, tokens

    async def everyone():
        return await asyncio.gather(*(client(i) for i in range(clients)))

    started = time.perf_counter()
    results = asyncio.run(everyone())
    wall = time.perf_counter() - started
    ttft = sorted(first for first, _ in results if first is not None)
    tokens = sum(count for _, count in results)
    return {"clients": clients, "ok": len(results), "wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1000 * quantile(ttft, 99), 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: a random model of --preset)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count()), help="CPUs (torch threads) of the replica")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)

    import torch
    from ray import serve

    from minimind.serve.app import ModelSpec, ServeSettings, build
    from minimind.serve.engine import ChatModel
    from minimind.serve.protocol import Limits

    model = args.model or random_demo_model(Path(tempfile.mkdtemp(prefix="bench-serve-")) / "model", args.preset)
    torch.set_num_threads(max(1, int(args.num_cpus)))  # what the replica gets
    local = ChatModel(model, Limits(max_tokens=max(args.max_tokens, 512)), args.max_batch, 0.01)
    base = start_local_serve(args.num_cpus)
    spec = ModelSpec("minimind", model, num_cpus=args.num_cpus, max_batch_size=args.max_batch, batch_wait_ms=10)
    serve.run(build(ServeSettings(models=[spec], limits=Limits(max_tokens=max(args.max_tokens, 512)))), name="bench",
              route_prefix="/")
    in_process(local, 1, 8)  # warm-up both ways (a compiled one-row step compiles here)
    run_setting(base, 1, 8, args.timeout)
    measured = {(way, clients): [] for way in ("in-process", "serve") for clients in args.clients}
    try:
        for _ in range(args.rounds):
            for clients in args.clients:
                measured["in-process", clients].append(in_process(local, clients, args.max_tokens))
                measured["serve", clients].append(run_setting(base, clients, args.max_tokens, args.timeout))
    finally:
        serve.shutdown()
    rows = []
    for clients in args.clients:
        local_rate = statistics.median(r["tokens_per_s"] for r in measured["in-process", clients])
        for way in ("in-process", "serve"):
            runs = measured[way, clients]
            rate = statistics.median(r["tokens_per_s"] for r in runs)
            rows.append({"clients": clients, "way": way, "ok": min(r["ok"] for r in runs), "tokens/s": rate,
                         "of in-process": f"{rate / local_rate:.2f}x",
                         "ttft p50 ms": statistics.median(r["ttft_p50_ms"] for r in runs),
                         "ttft p99 ms": statistics.median(r["ttft_p99_ms"] for r in runs)})
    print_table(rows, list(rows[0]))
    runs = {f"{way} {clients}": values for (way, clients), values in measured.items()}
    path = write_results("serve_overhead", {"args": vars(args), "rows": rows, "runs": runs})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
