"""Muon's Newton-Schulz work on N processes: every rank orthogonalising every matrix (what a plain
data-parallel Muon does) against clearlm dealing the matrices out over the ranks and all-gathering the
updates. Run it under torchrun, one thread per process, so the ranks do not share cores:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/muon_across_ranks.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from clearlm.train.optim import _replicated_updates
from clearlm.world import SINGLE, World, world


def _seconds(groups: list[list[torch.Tensor]], w: World) -> float:
    dist.barrier()
    started = time.perf_counter()
    for mats in groups:
        _replicated_updates(mats, w)
    dist.barrier()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    w = world()
    if not w.distributed:
        raise SystemExit("run under torchrun with at least 2 processes")
    torch.manual_seed(0)
    for d, hidden, layers in ((192, 512, 4), (768, 2048, 12)):  # the quickstart's and GPT-2 small's matrices
        groups = [[torch.randn(d, d) for _ in range(4 * layers)], [torch.randn(hidden, d) for _ in range(2 * layers)],
                  [torch.randn(d, hidden) for _ in range(layers)]]  # fmt: skip
        every, dealt = [], []
        for _ in range(args.rounds):  # alternating, best round kept
            every.append(_seconds(groups, SINGLE))
            dealt.append(_seconds(groups, w))
        if w.main:
            print(f"d {d}, {layers} layers, {w.size} ranks: every rank all {min(every):.3f} s, "
                  f"dealt out {min(dealt):.3f} s -> {min(every) / min(dealt):.2f}x")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
