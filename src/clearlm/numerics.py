"""The same numbers whatever ran before: the process state a stage's float results depend on, set at its start.

On a CPU a float result depends on more than its inputs: on how many threads a kernel splits its sums over,
and on MKL's code path and whether it may schedule threads dynamically (its "conditional numerical
reproducibility", CNR, is off by default). An earlier stage, a resumed run or a library may have left any of
these behind in the process. So every stage that computes with torch starts with `begin_stage`, which sets
the thread count from the recipe and the machine (never inherits it), turns off dynamic thread counts in
OpenMP and MKL, and resets the float32 matmul precision a GPU stage may have lowered. MKL reads `MKL_CBWR` once,
at its first call, so `import clearlm` sets it (`set_environment`) before anything can call MKL; `numerics()`
reads back the mode in effect and the code path MKL chose, which each artifact records with its thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Any

# MKL's CNR mode: AUTO picks the code path once per machine, STRICT makes its matrix products independent of
# memory alignment (and, as measured, of the thread count). Measured at no cost on a 2-core Xeon.
MATH_ENVIRONMENT = {"MKL_CBWR": "AUTO,STRICT"}
# The same variables as a user of another tool has them: an empty MKL_CBWR is MKL's own default (CNR off, its fastest
# kernels), and clearlm keeps a value that is set. Benchmarks run the peers they compare with in this environment, so
# that a peer is not slowed by clearlm's mode (strict MKL streams a one-row product at half the bandwidth).
PEER_ENVIRONMENT = {key: "" for key in MATH_ENVIRONMENT}
# mkl_cbwr.h's branch numbers
_MKL_BRANCHES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                 8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1",
                 14: "AVX512_E1"}  # fmt: skip
_MKL_CBWR_STRICT, _MKL_CBWR_ALL = 0x10000, -1


def set_environment() -> None:
    """Set the variables math libraries read once at start-up (a value the user set is kept)."""
    for key, value in MATH_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def available_cpus() -> int:
    """Cores this process may use (affinity-aware, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def stage_threads(requested: int, processes: int = 1) -> int:
    """The thread count a stage runs with: `requested`, else this process's share of the cores it may use."""
    return requested or max(1, available_cpus() // processes)


@functools.cache
def _symbol(name: str) -> Any:
    """A C function of the math libraries torch loaded (MKL inside libtorch_cpu on Linux x86-64, OpenMP in the
    global namespace), or None where this build has none."""
    import torch

    libraries = [Path(torch.__file__).parent / "lib" / "libtorch_cpu.so", None]
    for library in libraries:
        try:
            return getattr(ctypes.CDLL(str(library) if library else None), name)
        except (OSError, AttributeError, TypeError):
            continue
    return None


def _fixed_thread_counts() -> None:
    """Turn off OpenMP's and MKL's dynamic adjustment (which may lower a count under load, or if the user set
    OMP_DYNAMIC / MKL_DYNAMIC), so that a kernel uses exactly the threads it was given."""
    for name in ("omp_set_dynamic", "MKL_Set_Dynamic"):  # MKL_Set_Dynamic is MKL's by-value C entry point
        if (set_dynamic := _symbol(name)) is not None:
            with contextlib.suppress(OSError):
                set_dynamic(0)


def numerics() -> dict[str, Any]:
    """What this process's float results depend on besides the inputs: threads, the vector instructions torch's own
    kernels dispatch to (AVX2 and AVX-512 round their sums differently), and MKL's CNR mode and the code path it chose
    (where torch carries MKL)."""
    import torch

    info: dict[str, Any] = {"threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    get_mode, get_path = _symbol("mkl_serv_cbwr_get"), _symbol("mkl_serv_cbwr_get_auto_branch")
    if get_mode is None or get_path is None:
        return info
    mode = get_mode(_MKL_CBWR_ALL) & 0xFFFFFFFF  # the branch, and the STRICT flag
    branch = mode & 0xFFFF
    info["mkl_cbwr"] = _MKL_BRANCHES.get(branch, str(branch)) + (",STRICT" if mode & _MKL_CBWR_STRICT else "")
    path = branch if branch > 2 else get_path()  # a named branch, else the one MKL picks for this CPU
    info["mkl_path"] = _MKL_BRANCHES.get(path, str(path))
    return info


def mkl_strict() -> bool:
    """Whether MKL runs in its strict reproducible mode in this process (False where torch carries no MKL)."""
    return str(numerics().get("mkl_cbwr", "")).endswith(",STRICT")


def begin_stage(threads: int) -> dict[str, Any]:
    """Put the process in the state a stage's numbers are defined by, whatever an earlier stage or a library
    left, and return `numerics()` for its manifest."""
    import torch

    torch.set_num_threads(threads)
    _fixed_thread_counts()
    torch.set_float32_matmul_precision("highest")  # pretraining on a GPU lowers it to TF32 for itself
    return numerics()


def cnr_not_in_effect(info: dict[str, Any]) -> str | None:
    """Why MKL is not in the mode asked for (it ran before `import clearlm`), or None when it is."""
    wanted = os.environ.get("MKL_CBWR", "").upper().replace(" ", "")
    if "mkl_cbwr" not in info or not wanted or info["mkl_cbwr"] == wanted:
        return None
    return (f"MKL runs in its {info['mkl_cbwr']} mode, not MKL_CBWR={wanted}: it was used before clearlm was "
            "imported, so results may depend on memory alignment; import clearlm first, or set MKL_CBWR in the "
            "environment")  # fmt: skip


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
