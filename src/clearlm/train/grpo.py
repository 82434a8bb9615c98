"""GRPO as TRL's GRPOTrainer (1.16) computes it: group-normalised advantages, the clipped policy ratio, the KL
penalty to a reference, and TRL's four ways to normalise the summed token losses.

A generation batch holds `num_generations` completions of each of its prompts, one group after another. Each
optimization pass over it is one optimizer step, made of micro-batches whose losses add up to the step's loss
(TRL's gradient accumulation with `steps_per_generation` equal to it, its default). Everything is per token of the
completions (`mask` [batch, tokens] marks them, the end-of-text token included as TRL includes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from clearlm.model.transformer import Transformer
from clearlm.train.logps import answer_logps

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """TRL's `nanstd`: the standard deviation over the values that are not NaN, with Bessel's correction."""
    if dim is None:
        x, dim = x.flatten(), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim)
    return (variance * count / (count - 1)).sqrt()


@dataclass(frozen=True)
class Advantages:
    rewards: torch.Tensor  # [completions] the weighted sum of the verifiers that scored it (NaN: none did)
    advantages: torch.Tensor  # [completions]
    std: torch.Tensor  # [completions] the standard deviation that scaled it (of its group, or of the batch)
    zero_std: torch.Tensor  # [completions] bool: its group's rewards (or the batch's) are all equal


def total_rewards(per_verifier: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each completion's reward [completions]: the weighted sum of the verifiers that scored it (NaN where one does
    not apply), NaN where none did."""
    rewards = (per_verifier * weights[None]).nansum(dim=1)
    rewards[torch.isnan(per_verifier).all(dim=1)] = torch.nan
    return rewards


def advantages(per_verifier: torch.Tensor, weights: torch.Tensor, num_generations: int,
               scale_rewards: Literal["group", "batch", "none"]) -> Advantages:  # fmt: skip
    """TRL's `sum_then_normalize`: each completion's reward is `total_rewards`; its advantage is its reward less its
    group's mean, divided by the group's (or the batch's) standard deviation plus 1e-4 unless `scale_rewards` is
    "none". A completion no verifier scored has advantage 0."""
    rewards = total_rewards(per_verifier, weights)
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # "group", and "none", where it only says which groups had no variance
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return Advantages(rewards, torch.nan_to_num(adv, nan=0.0), std, torch.isclose(std, torch.zeros_like(std)))


def token_logps(model: Transformer, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each completion token's log-probability under `model` at `temperature` (TRL divides the logits by the
    sampling temperature), [batch, longest completion] with 0 past a completion's end, and the completions' mask.
    A prompt is run once for its group of completions."""
    picked, _ = answer_logps(model, prompts, completions, pad_id, temperature, share_prompts=True)
    mask = torch.zeros(len(completions), max(len(c) for c in completions))
    for row, completion in enumerate(completions):
        mask[row, : len(completion)] = 1.0
    return torch.zeros(mask.shape, dtype=picked.dtype).masked_scatter(mask.bool(), picked), mask


@dataclass(frozen=True)
class LossSettings:
    loss_type: LossType
    epsilon_low: float
    epsilon_high: float
    beta: float
    max_completion_length: int
    bias_correction_kl: bool = True  # TRL's `use_bias_correction_kl` (its default): the KL term times the ratio


def policy_loss(logps: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None, adv: torch.Tensor,
                mask: torch.Tensor, cfg: LossSettings, *, micro_batches: int, batch_tokens: float
                ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """One micro-batch's share of the step's loss, as TRL's `_compute_loss` gives it (already divided for gradient
    accumulation over `micro_batches`; "dapo" divides by the generation batch's `batch_tokens`), and its metrics:
    the KL to the reference and the clipped shares, token means over the micro-batch."""
    old = logps.detach() if old is None else old
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, clipped * a)
    kl = None
    if cfg.beta != 0.0:
        assert ref is not None, "a KL penalty needs the reference's log-probabilities"
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        if cfg.bias_correction_kl:  # DeepSeek-V3.2's unbiased reverse-KL gradient; the ratio is differentiable
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl
    masked = per_token * mask
    if cfg.loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / micro_batches
    elif cfg.loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0) / micro_batches
    elif cfg.loss_type == "dr_grpo":
        loss = masked.sum() / (per_token.shape[0] * cfg.max_completion_length) / micro_batches
    else:  # dapo: over every completion token of the generation batch
        loss = masked.sum() / max(batch_tokens, 1.0)

    def token_mean(x: torch.Tensor) -> float:
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    low = (ratio < 1 - cfg.epsilon_low) & (a < 0)
    high = (ratio > 1 + cfg.epsilon_high) & (a > 0)
    metrics = {"clip_ratio/low_mean": token_mean(low.float()), "clip_ratio/high_mean": token_mean(high.float()),
               "clip_ratio/region_mean": token_mean((low | high).float())}  # fmt: skip
    if kl is not None:
        metrics["kl"] = token_mean(kl.detach())
    return loss, metrics
