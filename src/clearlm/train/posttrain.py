"""The step loop shared by SFT and DPO: data order, schedule, logging, checkpoints and exact resume.

The order of examples is a permutation fixed by (seed, epoch) and the position in it is the step
number, so a run stopped after any step and resumed from its checkpoint (weights, optimizer and RNG
state, as in pretraining) takes exactly the steps the uninterrupted run takes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clearlm.model.transformer import Transformer
from clearlm.recipe import DPOConfig, RLVRConfig, SFTConfig
from clearlm.train import checkpoint, checkpoint_files
from clearlm.train.guard import LossGuard
from clearlm.train.loop import clip_gradients, read_log, truncate_log
from clearlm.train.optim import build_optimizer

StepFn = Callable[[list[int]], dict[str, float]]  # backward over these items; returns loss, tokens, metrics

# What one more forward and backward pass costs beyond its tokens, in tokens' worth of work: a step is cut into more,
# shorter passes only where the padding that saves is larger. Measured ~70 for the quickstart's model on 2 cores
# (a pass of n tokens took 5.9 ms + 0.083 ms x n, from 160 to 3,840 tokens); twice that, to stay on the safe side.
PASS_OVERHEAD = 128


def length_groups(lengths: Sequence[int], max_rows: int, rows_each: int = 1) -> list[list[int]]:
    """A step's items as forward passes of similar lengths: the positions of `lengths`, sorted by length and cut into
    runs of at most `max_rows` items (of `rows_each` padded rows each) so that padded tokens plus PASS_OVERHEAD per
    pass are fewest (exactly, by dynamic programming). A step's loss is a sum over its items over a count made for
    the whole step, so the grouping changes only rounding, and no pass is larger than a `max_rows` batch: random
    batches of SFT examples are ~40 % padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)  # over the first j sorted items
    for j in range(1, len(order) + 1):
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * rows_each * lengths[order[j - 1]] + PASS_OVERHEAD
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def lr_at(step: int, total: int, cfg: SFTConfig | DPOConfig | RLVRConfig) -> float:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay to zero (Tulu 3's schedule)."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total - step) / max(1, total - warmup))


def loss_ends(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean loss over the first and over the last tenth of the steps (one step's loss is noisy)."""
    n = max(1, len(records) // 10)
    return {"first_loss": sum(r["loss"] for r in records[:n]) / n,
            "final_loss": sum(r["loss"] for r in records[-n:]) / n}  # fmt: skip


def _describe_items(items: list[int], n_items: int) -> str:
    shown = ", ".join(str(i) for i in sorted(items)[:8]) + (", ..." if len(items) > 8 else "")
    return f"examples {shown} of the {n_items} trained on (numbered after dropped rows)"


def run_steps(
    model: Transformer,
    n_items: int,
    cfg: SFTConfig | DPOConfig,
    seed: int,
    out: Path,
    step_fn: StepFn,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Train for `cfg.epochs`; None when `stop_after` stopped the run (resume it with `resume=True`)."""
    torch.manual_seed(seed)
    opt = build_optimizer(model, cfg)
    section = "dpo" if isinstance(cfg, DPOConfig) else "sft"
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(n_items / per_step)
    total = cfg.epochs * steps_per_epoch
    ckpt_root, log_path = out / "checkpoints", out / "log.jsonl"
    start = 0
    found = checkpoint_files.latest_checkpoint(ckpt_root) if resume else None
    if found:
        start = checkpoint.load_checkpoint(found, model, opt)["step"]
        truncate_log(log_path, start)
    elif log_path.exists():
        log_path.unlink()
    end = max(start, min(total, stop_after)) if stop_after else total
    guard = LossGuard(cfg.spike_factor, section, read_log(log_path) if found else [], ckpt_root)
    model.train()
    for step in range(start, end):
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        items = order[k * per_step : (k + 1) * per_step]
        metrics = step_fn(items)
        grad_norm = clip_gradients(model, cfg.grad_clip)
        guard.check(step + 1, metrics["loss"], grad_norm, lr, lambda: _describe_items(items, n_items))  # noqa: B023
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = metrics.pop("tokens")
        record = {"step": step + 1, "epoch": epoch + 1, **metrics, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / (time.perf_counter() - started)}  # fmt: skip
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if on_step:
            on_step({**record, "max_steps": total})
        if cfg.checkpoint_interval and (step + 1) % cfg.checkpoint_interval == 0 and step + 1 < end:
            checkpoint.save_checkpoint(ckpt_root, step + 1, model, opt, {"step": step + 1}, keep_optimizer=False)
    if end < total:
        checkpoint.save_checkpoint(ckpt_root, end, model, opt, {"step": end}, keep_optimizer=True)
        return None
    shutil.rmtree(ckpt_root, ignore_errors=True)
    model.eval()
    return {"steps": total, **loss_ends(read_log(log_path))}
