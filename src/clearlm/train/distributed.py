"""torchrun support: the same training code for one process and for N, chosen by the environment.

`torchrun --nproc_per_node N -m clearlm train RECIPE` sets RANK/WORLD_SIZE/LOCAL_RANK; `world()`
joins the process group (NCCL on GPUs, gloo on CPUs) and the model is replicated (DDP) or fully
sharded (FSDP2's `fully_shard`, per block then the root) as `train.distributed` says. One process
ignores the setting. The batch is global: `micro_batch_size x grad_accum_steps` windows per step,
the micro-batches dealt out to the ranks, so the recipe, its digest, the data stream and (up to
float summation order) the losses do not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from clearlm.errors import RecipeError
from clearlm.model.transformer import Transformer
from clearlm.recipe import TrainConfig


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
        dist.barrier()


def shared_path(path: str, w: World) -> str:
    """Rank 0's `path`, on every rank (for a scratch folder that all ranks must use)."""
    if not w.distributed:
        return path
    holder = [path]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap(model: Transformer, strategy: str, w: World, device: torch.device) -> nn.Module:
    """The module to call in training: the model itself (one process), DDP around it, or the model sharded
    in place by FSDP2 (then it is its own wrapper, and its parameters are DTensors)."""
    if not w.distributed:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def check_supported(cfg: TrainConfig, w: World) -> None:
    """One-line errors for what this world cannot run."""
    if cfg.grad_accum_steps % w.size:
        raise RecipeError(
            f"train.grad_accum_steps ({cfg.grad_accum_steps}) counts micro-batches over all processes and must be a "
            f"multiple of their number ({w.size}), so that every process runs as many"
        )


def sync_gradients(engine: nn.Module, sync: bool) -> None:
    """Turn the gradient all-reduce on (last micro-batch) or off (the ones before) for accumulation."""
    if hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(sync)
    elif hasattr(engine, "require_backward_grad_sync"):  # DDP
        engine.require_backward_grad_sync = sync
