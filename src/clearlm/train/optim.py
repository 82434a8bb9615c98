"""Optimizers (AdamW; Muon for hidden matrices with AdamW for the rest) and learning-rate schedules
(warmup then cosine, or warmup-stable-decay).

Muon follows Keller Jordan's reference (modded-nanogpt): Nesterov momentum, orthogonalised by five
Newton-Schulz iterations, scaled by sqrt(max(1, rows/cols)), with decoupled weight decay as in
Moonlight. Under FSDP2 each sharded matrix is gathered whole, orthogonalised (every rank computes
the same update) and cut back to the rank's shard. It is written here rather than imported because
no released package provides it for the torch this project pins, and it is one short function plus
a step loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from clearlm.recipe import DPOConfig, SFTConfig, TrainConfig

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


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (possibly FSDP2-sharded) tensor: Newton-Schulz needs all of it."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`update` laid out as `param` is: each rank keeps its own shard of the (identical) whole update."""
    if isinstance(param, DTensor):
        return distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)
    return update


class Muon(torch.optim.Optimizer):
    """Groups with `use_muon` True get Muon; the others AdamW (embeddings, output layer, norms)."""

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float = 1e-8) -> None:
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.95, "betas": betas, "eps": eps})

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
        for shape, indices in by_shape.items():
            orthogonal = newton_schulz(torch.stack([_whole(nesterov[i]) for i in indices]))
            orthogonal *= max(1.0, shape[-2] / shape[-1]) ** 0.5
            for k, i in enumerate(indices):
                updates[i] = _like(orthogonal[k], params[i])
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


def build_optimizer(model: nn.Module, cfg: TrainConfig | SFTConfig | DPOConfig) -> torch.optim.Optimizer:
    """Matrices (embeddings included) decay; norms do not. Each group keeps its peak rate in `base_lr`, which
    the schedule scales. AdamW uses torch's fused kernel (CPU and GPU)."""
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
        return Muon([g for g in groups if g["params"]], betas=betas)
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
