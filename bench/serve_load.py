"""Serving under mixed load: C concurrent clients for D seconds against one model replica, each client
sending request after request with one of four sampling settings, half of them streaming.

    python bench/serve_load.py                         # 64 clients, 60 s mixed, then 60 s uniform (all greedy)
    python bench/serve_load.py --clients 64 --duration 60 --max-tokens 64 --timeout 60

Replies vary in length as real ones do: each request asks for between 1/4 and 7/4 of --max-tokens
(drawn per client and request, the same in every run), and the default random model always uses all.

Reports per setting: requests, errors by status (a 5xx or a timeout is a failure; a 429 with Retry-After
is the server's back-pressure, counted apart), p50/p99 time to first token of its streaming requests
(the first text delta), p99 latency of all its requests, and the starvation ratio: the largest
per-setting p99 TTFT over the smallest (target <= 2). Then total tokens/s, mixed vs uniform. Bounded: every client
stops starting requests at the deadline, each request has --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_table, write_results  # noqa: E402
from bench.serve import quantile, random_demo_model, start_local_serve  # noqa: E402

SETTINGS = {  # name -> sampling fields of the request; the seeded one's seed is the client's number
    "greedy": {"temperature": 0},
    "top_p": {"temperature": 0.9, "top_p": 0.9},
    "top_k+penalty": {"temperature": 1.2, "top_k": 20, "repetition_penalty": 1.1},
    "seeded": {"temperature": 0.8, "seed": None},
}


def one_request(url: str, client: int, setting: str, stream: bool, max_tokens: int, timeout: float) -> dict:
    sampling = dict(SETTINGS[setting])
    if "seed" in sampling:
        sampling["seed"] = client
    body = json.dumps({"model": "minimind", "messages": [{"role": "user", "content": f"第{client}个问题：请讲一个故事。"}],
                       "max_tokens": max_tokens, "stream": stream, "stream_options": {"include_usage": True} if stream else None,
                       **sampling}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first, tokens, status = None, 0, 200
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if stream:
                for line in response:
                    if first is None and line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                        first = time.perf_counter()
                    elif line.startswith(b"data: {") and b'"usage"' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                tokens = json.loads(response.read())["usage"]["completion_tokens"]
    except urllib.error.HTTPError as error:
        status = error.code
    except (TimeoutError, OSError):
        status = "timeout"
    ended = time.perf_counter()
    return {"setting": setting, "stream": stream, "status": status, "tokens": tokens,
            "ttft": (first - started) if first else None, "latency": ended - started}


def run_load(
    base: str, clients: int, duration: float, max_tokens: int, timeout: float, settings: list[str]
) -> tuple[list[dict], float]:
    url, results, lock = base + "/v1/chat/completions", [], threading.Lock()
    deadline = time.perf_counter() + duration

    def client(index: int):
        setting, sent, lengths = settings[index % len(settings)], 0, random.Random(index)
        while time.perf_counter() < deadline:
            length = lengths.randint(max(1, max_tokens // 4), max_tokens * 7 // 4)
            result = one_request(
                url, index, setting, stream=(index // len(settings) + sent) % 2 == 0, max_tokens=length, timeout=timeout
            )
            sent += 1
            with lock:
                results.append(result)
            if result["status"] == 429:
                time.sleep(0.1)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + timeout + 30)
    return results, time.perf_counter() - started


def summarise(results: list[dict], wall: float, phase: str) -> list[dict]:
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        mine = [r for r in results if r["setting"] == setting]
        ok = [r for r in mine if r["status"] == 200]
        ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
        rows.append(
            {
                "phase": phase,
                "setting": setting,
                "requests": len(mine),
                "ok": len(ok),
                "429": sum(r["status"] == 429 for r in mine),
                "5xx": sum(isinstance(r["status"], int) and r["status"] >= 500 for r in mine),
                "other_4xx": sum(isinstance(r["status"], int) and 400 <= r["status"] < 500 and r["status"] != 429 for r in mine),
                "timeouts": sum(r["status"] == "timeout" for r in mine),
                "tokens": sum(r["tokens"] for r in ok),
                "ttft_p50_ms": round(1000 * statistics.median(ttft)) if ttft else None,
                "ttft_p99_ms": round(1000 * quantile(ttft, 99)) if ttft else None,
                "latency_p99_ms": round(1000 * quantile([r["latency"] for r in ok], 99)) if ok else None,
            }
        )
    total = {
        "phase": phase,
        "setting": "all",
        "requests": len(results),
        "ok": sum(r["ok"] for r in rows),
        **{key: sum(r[key] for r in rows) for key in ("429", "5xx", "other_4xx", "timeouts", "tokens")},
        "tokens_per_s": round(sum(r["tokens"] for r in rows) / wall, 1),
    }
    p99s = [r["ttft_p99_ms"] for r in rows if r["ttft_p99_ms"]]
    total["starvation_ratio"] = round(max(p99s) / min(p99s), 2) if p99s else None
    return rows + [total]


COLUMNS = [
    "phase",
    "setting",
    "requests",
    "ok",
    "429",
    "5xx",
    "other_4xx",
    "timeouts",
    "tokens",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "latency_p99_ms",
    "tokens_per_s",
    "starvation_ratio",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI or directory (default: a random demo-preset model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per phase")
    parser.add_argument("--max-tokens", type=int, default=64, help="the mean reply length asked for")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="each request's client-side limit (s)")
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count()), help="CPUs (torch threads) of the replica")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform (all greedy) phase")
    args = parser.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from minimind.serve.app import ModelSpec, ServeSettings, build
    from minimind.serve.protocol import Limits

    model = args.model or random_demo_model(Path(tempfile.mkdtemp(prefix="bench-serve-load-")) / "model")
    base = start_local_serve(args.num_cpus)
    spec = ModelSpec(
        "minimind", model, num_cpus=args.num_cpus, num_gpus=float(torch.cuda.is_available()), max_batch_size=args.max_batch_size
    )
    rows = []
    try:
        serve.run(
            build(ServeSettings(models=[spec], limits=Limits(max_tokens=max(args.max_tokens, 512)))),
            name="bench",
            route_prefix="/",
        )
        one_request(base + "/v1/chat/completions", 0, "greedy", True, 8, args.timeout)  # warm-up
        phases = [("mixed", list(SETTINGS))] + ([] if args.no_uniform else [("uniform", ["greedy"])])
        for phase, settings in phases:
            results, wall = run_load(base, args.clients, args.duration, args.max_tokens, args.timeout, settings)
            rows += summarise(results, wall, phase)
            print_table(rows[-len(settings) - 1 :], COLUMNS)
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    print_table(rows, COLUMNS)
    print("(TTFT: first text delta of the streaming requests; starvation: max/min per-setting p99 TTFT)")
    path = write_results(
        "serve_load",
        {
            "model": model,
            "clients": args.clients,
            "duration_s": args.duration,
            "max_tokens": args.max_tokens,
            "max_batch_size": args.max_batch_size,
            "rows": rows,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
