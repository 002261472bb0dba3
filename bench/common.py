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

RESULTS_DIR = Path(__file__).parent / "results"


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


def peak_matmul_flops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The training loop's own roof measurement, with a larger matrix and more repeats."""
    from minimind.train import peak_flops

    return peak_flops(device, dtype, size=size, repeats=repeats)


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


def hf_llama_twin(config):
    """transformers' LlamaForCausalLM with exactly our shape (and, once weights are copied, our math)."""
    from transformers import LlamaForCausalLM

    from minimind.checkpoint import llama_config

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
