"""torchrun support: the same training code for one process and for N (`clearlm.world` says which).

The model is replicated (DDP) or fully sharded (FSDP2's `fully_shard`, per block then the root) as
`train.distributed` says. One process ignores the setting. The batch is global: `micro_batch_size x
grad_accum_steps` windows per step, the micro-batches dealt out to the ranks, so the recipe, its digest,
the data stream and (up to float summation order) the losses do not depend on the number of processes.
"""

from __future__ import annotations

import torch
from torch import nn

from clearlm.errors import RecipeError
from clearlm.model.transformer import Transformer
from clearlm.recipe import TrainConfig
from clearlm.world import World


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
