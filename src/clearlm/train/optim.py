"""Optimizers (AdamW; Muon for hidden matrices with AdamW for the rest) and learning-rate schedules
(warmup then cosine, or warmup-stable-decay).

Muon follows Keller Jordan's reference (modded-nanogpt): Nesterov momentum, orthogonalised by five
Newton-Schulz iterations, scaled by sqrt(max(1, rows/cols)), with decoupled weight decay as in
Moonlight. Across processes the Newton-Schulz work is dealt out, as in modded-nanogpt: each rank
orthogonalises every N-th matrix of a shape. Under DDP (every rank holds every whole matrix) the
ranks then all-gather the updates; under FSDP2 one all-to-all brings each matrix's shards to the rank
that owns it and a second sends each rank its shard of every update, so no rank gathers the whole
model. It is written here rather than imported because no released package provides it for the
torch this project pins.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from clearlm.errors import TrainingError
from clearlm.recipe import DPOConfig, RLVRConfig, SFTConfig, TrainConfig
from clearlm.world import SINGLE, World

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic: fast, singular values near 1


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U V^T of g's SVD, singular values
    pushed into roughly [0.7, 1.2]), computed in bfloat16 on GPU and float32 on CPU."""
    a, b, c = _NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def _orthogonalised(mats: torch.Tensor) -> torch.Tensor:
    """Muon's update for a [n, rows, cols] batch: Newton-Schulz, scaled by sqrt(max(1, rows/cols))."""
    return newton_schulz(mats) * max(1.0, mats.size(-2) / mats.size(-1)) ** 0.5


def _dealt(mats: list[torch.Tensor], world: int) -> tuple[int, list[torch.Tensor]]:
    """Matrix k goes to rank k % world as the (k // world)-th of its batch; zero matrices pad the list to a
    multiple of the world size (their update is zero and is dropped)."""
    chunks = -(-len(mats) // world)
    return chunks, mats + [torch.zeros_like(mats[0])] * (chunks * world - len(mats))


def _replicated_updates(mats: list[torch.Tensor], w: World) -> list[torch.Tensor]:
    """Updates of whole matrices that every rank of `w` holds (one process, or DDP after its all-reduce)."""
    if not w.distributed:
        return list(_orthogonalised(torch.stack(mats)))
    chunks, padded = _dealt(mats, w.size)
    own = _orthogonalised(torch.stack(padded[w.rank :: w.size])).contiguous()  # as collectives need it
    every = own.new_empty((w.size * chunks, *own.shape[1:]))  # [q * chunks + c]: rank q's c-th, matrix c*size + q
    dist.all_gather_into_tensor(every, own)
    return list(every.unflatten(0, (w.size, chunks)).transpose(0, 1).flatten(0, 1)[: len(mats)])


def _sharded_updates(mats: list[DTensor]) -> list[DTensor]:
    """Updates of FSDP2 matrices (rows sharded over the ranks as torch.chunk cuts them), each rank sending and
    receiving only shards: an all-to-all assembles every matrix on the rank that owns it, a second returns
    each rank its shard of every update."""
    first = mats[0]
    for m in mats:
        if m.device_mesh != first.device_mesh or m.device_mesh.ndim != 1 or m.placements != (Shard(0),):
            raise TrainingError(f"Muon under FSDP2 expects rows sharded over one mesh dimension, got {m.placements}")
    group = first.device_mesh.get_group()
    world = dist.get_world_size(group)
    rows, cols = first.shape
    span = -(-rows // world)  # rows per rank; the last ranks may hold fewer, or none
    local = [m.to_local() for m in mats]
    chunks = -(-len(local) // world)
    send = local[0].new_zeros((world, chunks, span, cols))  # [q, c]: this rank's rows of matrix c*world + q
    for k, shard in enumerate(local):  # the slots past the last matrix stay zero: padding, as `_dealt` adds
        send[k % world, k // world, : shard.size(0)] = shard
    received = torch.empty_like(send)  # [q, c]: rank q's rows of matrix c*world + rank
    dist.all_to_all_single(received, send, group=group)
    whole = received.transpose(0, 1).reshape(chunks, world * span, cols)[:, :rows]
    back = whole.new_zeros((chunks, world * span, cols))
    back[:, :rows] = _orthogonalised(whole)
    dist.all_to_all_single(received, back.unflatten(1, (world, span)).transpose(0, 1).contiguous(), group=group)
    return [DTensor.from_local(received[k % world, k // world, : shard.size(0)], m.device_mesh, m.placements,
                               run_check=False, shape=m.shape, stride=m.stride())
            for k, (shard, m) in enumerate(zip(local, mats, strict=True))]  # fmt: skip


class Muon(torch.optim.Optimizer):
    """Groups with `use_muon` True get Muon; the others AdamW (embeddings, output layer, norms). `w` is the
    world whose ranks share the Newton-Schulz work (every rank of it must step together)."""

    def __init__(
        self, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float = 1e-8, w: World = SINGLE
    ) -> None:
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.95, "betas": betas, "eps": eps})
        self.world = w

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = self._muon_updates(params, group["momentum"]) if group["use_muon"] else [
                self._adamw_update(p, group) for p in params]  # fmt: skip
            for p, update in zip(params, updates, strict=True):
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)

    def _muon_updates(self, params: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
        """Nesterov momentum, orthogonalised: matrices of one shape go through Newton-Schulz together as one
        batch (a handful of batched matmuls instead of one small loop per matrix)."""
        nesterov = []
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buf = self.state[p]["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            nesterov.append(p.grad.lerp(buf, momentum))
        updates: list[torch.Tensor] = [torch.empty(0)] * len(params)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for indices in by_shape.values():
            mats = [nesterov[i] for i in indices]
            sharded = isinstance(mats[0], DTensor)
            orthogonal = _sharded_updates(mats) if sharded else _replicated_updates(mats, self.world)
            for i, update in zip(indices, orthogonal, strict=True):
                updates[i] = update
        return updates

    def _adamw_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - beta1**t) / denom


def _is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    return p.dim() == 2 and not name.startswith(("embed_tokens", "lm_head"))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig | SFTConfig | DPOConfig | RLVRConfig, w: World = SINGLE
) -> torch.optim.Optimizer:
    """Matrices (embeddings included) decay; norms do not. Each group keeps its peak rate in `base_lr`, which
    the schedule scales. AdamW uses torch's fused kernel (CPU and GPU). `w`: the ranks training `model` together."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if getattr(cfg, "optimizer", "adamw") == "muon":
        betas = (cfg.beta1, cfg.beta2)
        groups = [
            {"params": [p for n, p in named if _is_hidden_matrix(n, p)], "use_muon": True, "base_lr": cfg.muon_lr,
             "momentum": cfg.muon_momentum, "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if not _is_hidden_matrix(n, p) and p.dim() >= 2], "use_muon": False,
             "base_lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "use_muon": False, "base_lr": cfg.lr, "weight_decay": 0.0},
        ]  # fmt: skip
        return Muon([g for g in groups if g["params"]], betas=betas, w=w)
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup, then cosine
    to min_lr_ratio, or (wsd) constant until the last decay_fraction of the steps, then linear to it."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = max(round(cfg.max_steps * cfg.decay_fraction), 1)
        decay_start = max(cfg.max_steps - decay_steps, cfg.warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min((step + 1 - decay_start) / max(cfg.max_steps - decay_start, 1), 1.0)
        return 1.0 - (1.0 - floor) * progress
    progress = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 1.0)
    return floor + 0.5 * (1.0 - floor) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The AdamW learning rate at `step` (what the log reports)."""
    return cfg.lr * lr_factor(step, cfg)
