"""Throughput accounting: the machine's measured fp32 matmul peak, cached, for model FLOPs use."""

from __future__ import annotations

import ctypes
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
        a, b = torch.randn(n, n), torch.randn(n, n)
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
            tmp = file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=2))
            os.replace(tmp, file)
        except OSError:
            pass
    return float(cache[key])


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it to the OS after every large tensor.

    By default glibc serves allocations above a (dynamic) threshold with fresh mmap pages, so each
    new activation pays one page fault per 4 KiB; PyTorch's CPU allocator has no cache of its own.
    This is what preloading jemalloc or tcmalloc achieves, done in-process. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest threshold glibc accepts on 64-bit
    ok &= libc.mallopt(m_trim_threshold, 1 << 30)
    ok &= libc.mallopt(m_top_pad, 64 << 20)
    return bool(ok)
