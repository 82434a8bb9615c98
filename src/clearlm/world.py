"""This process's place in a torchrun job, read from the environment; torch is imported only when a process
group is joined, so that commands that never train start without it.

`torchrun --nproc_per_node N -m clearlm train RECIPE` sets RANK/WORLD_SIZE/LOCAL_RANK; `world()` joins the
process group (NCCL on GPUs, gloo on CPUs) once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def world() -> World:
    """This process's place in a torchrun job (joining the process group once), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        # gloo for CPU tensors beside NCCL for GPU ones (a recipe may train on the CPU of a GPU machine); the
        # timeout is long because the other ranks wait while rank 0 builds the data stages
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return World(rank, size, local)


def barrier(w: World) -> None:
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()


def shared_path(path: str, w: World) -> str:
    """Rank 0's `path`, on every rank (for a scratch folder that all ranks must use)."""
    if not w.distributed:
        return path
    import torch.distributed as dist

    holder = [path]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
