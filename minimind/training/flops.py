"""The roof model FLOPs utilisation (MFU) is measured against: the device's dense bf16 peak from its
vendor's datasheet where the device is known, else the throughput of a large matmul measured on it.

A measured matmul understates a large GPU's peak (a 1024² product is mostly launch overhead there), which
overstates MFU; the datasheet number is what MFU figures in papers and other trainers divide by.
"""

from __future__ import annotations

import time

import torch

# Dense (no 2:4 sparsity) bf16 tensor throughput with fp32 accumulation, in TFLOP/s, by a lowercase
# piece of `torch.cuda.get_device_name()`; the first match wins, so specific names come first.
# GeForce cards accumulate in fp32 at half their fp16-accumulate rate, which is what torch uses.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.4),
    ("h200 nvl", 835.5),
    ("h200", 989.4),
    ("h100 nvl", 835.5),
    ("h100 pcie", 756.5),
    ("h100", 989.4),  # SXM
    ("h800 pcie", 756.5),
    ("h800", 989.4),
    ("h20", 148.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("a6000", 154.8),
    ("a40", 149.7),
    ("6000 ada", 364.2),
    ("l40s", 362.05),
    ("l40", 181.05),
    ("l4", 121.0),
    ("rtx 5090", 209.5),
    ("rtx 4090", 165.2),
    ("rtx 4080", 97.5),
    ("rtx 3090", 71.0),
    ("rtx 3080", 59.5),
    ("mi300x", 1307.4),
    ("mi250x", 191.5),  # per GCD, which torch sees as one device
)


def known_peak_flops(device_name: str) -> float | None:
    """The datasheet bf16 peak of a device name (FLOP/s), or None for a device not in the table."""
    name = device_name.lower()
    if "laptop" in name:  # laptop parts share desktop names at far lower clocks
        return None
    return next((tflops * 1e12 for piece, tflops in PEAK_BF16_TFLOPS if piece in name), None)


def measured_matmul_flops(device: torch.device | str, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul, the best of `repeats` after a warm-up. On a GPU the matrix is large
    (8192²) so the kernel, not its launch, is what is timed."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device | str, dtype: torch.dtype, size: int | None = None) -> tuple[float, str]:
    """(FLOP/s, where the number comes from) for MFU of training in `dtype` on `device`; `size` is the
    measured matmul's, for devices not in the table."""
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        known = known_peak_flops(name)
        if known:
            return known, f"{name}'s dense bf16 peak, {known / 1e12:,.0f} TFLOP/s (datasheet)"
    measured = measured_matmul_flops(device, dtype, size)
    return measured, f"a measured {str(dtype).removeprefix('torch.')} matmul on {device.type}, {measured / 1e9:,.0f} GFLOP/s"
