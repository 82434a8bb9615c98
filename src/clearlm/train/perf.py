"""Throughput accounting for model FLOPs use (MFU): on CPU the machine's fp32 matmul peak, measured once
and cached; on GPU the named device's dense bf16 tensor-core peak from its datasheet (or the recipe's
`train.peak_flops`), never one card's constant for all.

Measuring the peak leaves nothing behind in the process (its random operands come from a generator of its
own, the thread count is restored), so a run with a cold cache computes the same numbers as a warm one."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "clearlm" / "matmul_peak.json"


def measure_matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul with `threads` threads: the ceiling a training step can reach."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)  # never the global generator, which checkpoints record
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(previous)


def cpu_matmul_peak(threads: int) -> float:
    """The measured peak for this CPU, thread count and torch version, measured once and cached."""
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{threads}|{torch.__version__}"
    file = _cache_file()
    try:
        cache = json.loads(file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_matmul_peak(threads)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp")  # two runs measuring at once never share one
            tmp.write_text(json.dumps(cache, indent=2))
            os.replace(tmp, file)
        except OSError:
            pass
    return float(cache[key])


# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's and AMD's datasheets, matched by name.
GPU_BF16_PEAK = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
)


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA device name, or None for one not in the table."""
    return next((peak for key, peak in GPU_BF16_PEAK if key.lower() in name.lower()), None)


def device_peak_flops(device: torch.device, threads: int, override: float | None = None) -> float | None:
    """The peak that MFU divides by: the recipe's, else the GPU's from the table, else the CPU's measured."""
    if override:
        return override
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_matmul_peak(threads)
