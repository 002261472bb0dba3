"""Shared helpers of the bench scripts: peak matmul throughput, timing, the Llama twin, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).parent / "results")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def peak_matmul_flops(device: str, dtype: torch.dtype, size: int | None = None) -> float:
    """The training loop's own roof: the datasheet bf16 peak of a known GPU, else a measured matmul
    (2048² on CPU, larger and more stable than the loop's quick 1024²)."""
    from minimind.training.flops import peak_flops

    return peak_flops(device, dtype, size=size or (2048 if device == "cpu" else None))[0]


def time_calls(fn, device: str, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def memory_bandwidth(device: str, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted, as STREAM's copy does), the best of `repeats`
    into an already-touched destination."""
    source = torch.ones(int(gib * 2**30) // 4, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)
    seconds = time_calls(lambda: destination.copy_(source), device, warmup=1, repeats=repeats)
    return 2 * source.numel() * 4 / min(seconds)


def hf_llama_twin(config):
    """transformers' LlamaForCausalLM with exactly our shape (and, once weights are copied, our math)."""
    from transformers import LlamaForCausalLM

    from minimind.model.hf import llama_config

    return LlamaForCausalLM(llama_config(config))


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
