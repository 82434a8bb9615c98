"""The same numbers whatever ran before: the process state a stage's float results depend on, set at its start.

On a CPU a float result depends on more than its inputs: on how many threads a kernel splits its sums over,
on MKL's code path and whether it lets threads take work dynamically (its "conditional numerical
reproducibility", CNR, is off by default), and on settings that an earlier stage, a resumed run or a library
may have left behind in the process. So every stage that computes with torch starts with `begin_stage`, which
sets the thread count from the recipe and the machine (never inherits it), turns off dynamic thread counts in
OpenMP and MKL (which may lower them under load), and sets the allocator options training wants. MKL reads
`MKL_CBWR` once, at its first call, so `clearlm/__init__.py` sets it before torch is imported; `numerics()`
reports the mode in effect, which each artifact records beside its thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

# MKL's CNR mode: AUTO picks the code path once per machine, STRICT makes results independent of memory
# alignment as well. Measured free on a 2-core Xeon (a quickstart step: 0.90-0.98 s in both modes).
ENVIRONMENT = {"MKL_CBWR": "AUTO,STRICT"}
_MKL_CBWR_NAMES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSE4_2", 7: "AVX",
                   8: "AVX2", 9: "AVX512_MIC", 10: "AVX512", 11: "AVX512_MIC_E1", 12: "AVX512_E1"}  # fmt: skip
_MKL_CBWR_STRICT = 0x10000


def set_environment() -> None:
    """Set the variables math libraries read once at start-up (a value the user set is kept)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def available_cpus() -> int:
    """Cores this process may use (affinity-aware, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def stage_threads(requested: int, processes: int = 1) -> int:
    """The thread count a stage runs with: `requested`, else this process's share of the cores it may use."""
    return requested or max(1, available_cpus() // processes)


def _mkl() -> ctypes.CDLL | None:
    """torch's MKL (linked into libtorch_cpu on Linux x86-64), or None where torch has none."""
    import torch

    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        mkl = ctypes.CDLL(str(library))
        mkl.MKL_Set_Dynamic, mkl.mkl_serv_cbwr_get  # noqa: B018 - present only in builds with MKL
    except (OSError, AttributeError):
        return None
    return mkl


def _fixed_thread_counts() -> None:
    """Turn off OpenMP's and MKL's dynamic adjustment, so a kernel uses exactly the threads it was given."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # no OpenMP here (or no global symbol table)
        ctypes.CDLL(None).omp_set_dynamic(0)
    if (mkl := _mkl()) is not None:
        mkl.MKL_Set_Dynamic(0)


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


def numerics() -> dict[str, Any]:
    """What this process's float results depend on besides the inputs: threads and MKL's CNR mode."""
    import torch

    info: dict[str, Any] = {"threads": torch.get_num_threads()}
    if (mkl := _mkl()) is not None:
        mode = mkl.mkl_serv_cbwr_get(-1) & 0xFFFFFFFF  # MKL_CBWR_ALL: the branch and the STRICT flag
        name = _MKL_CBWR_NAMES.get(mode & 0xFFFF, str(mode & 0xFFFF))
        info["mkl_cbwr"] = name + (",STRICT" if mode & _MKL_CBWR_STRICT else "")
    return info


def begin_stage(threads: int) -> dict[str, Any]:
    """Put the process in the state a stage's numbers are defined by (whatever an earlier stage left) and
    return `numerics()` for its manifest."""
    import torch

    torch.set_num_threads(threads)
    _fixed_thread_counts()
    keep_freed_memory()
    return numerics()
