"""The pretraining loop: a short loop in nanoGPT's spirit, with exact resume.

The data position (windows consumed), the optimizer state, the RNG and the step are the whole
state; restoring them continues bit-identically on CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clearlm.data.shards import WindowSampler, open_tokens
from clearlm.errors import InputError, RecipeError, TrainingError
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.model.weights import save_model
from clearlm.recipe import Recipe, TrainConfig
from clearlm.train import checkpoint
from clearlm.train.optim import build_optimizer, lr_at
from clearlm.train.perf import cpu_matmul_peak, keep_freed_memory

LOG = "log.jsonl"
StepCallback = Callable[[dict[str, Any]], None]


def model_config(recipe: Recipe, vocab_size: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab_size, **recipe.model.model_dump(exclude={"architecture"}))


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is 'cuda' but this torch build sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(cfg.device)


def accumulate_gradients(model: Transformer, micro_batches: list[torch.Tensor]) -> float:
    """Backward over micro-batches of [B, T+1] ids with the loss averaged over all their target tokens.

    Each micro-batch's summed loss is divided by the token count of the whole accumulated batch, so
    micro-batches of different sizes weigh by their tokens, exactly as one large batch would.
    """
    n_targets = sum(b[:, 1:].numel() for b in micro_batches)
    loss_sum = 0.0
    for batch in micro_batches:
        loss = model.loss_sum(batch[:, :-1], batch[:, 1:])
        (loss / n_targets).backward()
        loss_sum += loss.item()
    return loss_sum / n_targets


def optimizer_step(model: Transformer, opt: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip (0 = no clipping), step and clear gradients; returns the pre-clipping gradient norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def train_step(
    model: Transformer, opt: torch.optim.Optimizer, micro_batches: list[torch.Tensor], grad_clip: float
) -> tuple[float, float]:
    """One optimizer step: (mean loss per target token, gradient norm)."""
    loss = accumulate_gradients(model, micro_batches)
    return loss, optimizer_step(model, opt, grad_clip)


def available_cpus() -> int:
    """Cores this process may use (affinity-aware, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@torch.no_grad()
def validation_loss(model: Transformer, sampler: WindowSampler, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(cfg.eval_batches):
        batch = sampler.sequential(i * cfg.micro_batch_size, cfg.micro_batch_size).to(device)
        total += model.loss_sum(batch[:, :-1], batch[:, 1:]).item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def read_log(path: Path) -> list[dict[str, Any]]:
    """Log records; a line torn by a crash mid-write is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep the records up to `step` (the checkpoint resumed from), written atomically."""
    kept = [r for r in read_log(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _sampler(shards_dir: Path, split: str, dtype: str, context: int, seed: int) -> WindowSampler:
    tokens = open_tokens(shards_dir, split, dtype)
    if len(tokens) < context + 1:
        raise InputError(
            f"the {split} split has {len(tokens)} tokens, fewer than one window of model.context + 1 = "
            f"{context + 1}: lower model.context or add data"
        )
    return WindowSampler(tokens, context, seed)


def _on_schedule(step: int, cfg: TrainConfig) -> bool:
    return step == cfg.max_steps or bool(cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)


def pretrain(
    recipe: Recipe,
    shards_dir: Path,
    shards_meta: dict[str, Any],
    vocab_size: int,
    out: Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train from scratch (or resume) into `out`; return summary metrics. Stops early at `stop_after`."""
    cfg = recipe.train
    threads = cfg.threads or available_cpus()
    torch.set_num_threads(threads)
    device = pick_device(cfg)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(recipe.seed)

    mcfg = model_config(recipe, vocab_size)
    model = Transformer(mcfg)
    model.init_weights(recipe.seed)
    model.to(device).train()
    opt = build_optimizer(model, cfg, device)
    dtype = shards_meta["dtype"]
    train_windows = _sampler(shards_dir, "train", dtype, mcfg.context, recipe.seed)
    val_windows = _sampler(shards_dir, "validation", dtype, mcfg.context, recipe.seed)

    ckpt_root, log_path = out / "checkpoints", out / LOG
    state: dict[str, Any] = {"step": 0, "position": 0, "tokens": 0, "seconds": 0.0}
    found = checkpoint.latest_checkpoint(ckpt_root) if resume else None
    if found:
        state = checkpoint.load_checkpoint(found, model, opt)
        truncate_log(log_path, state["step"])
    elif log_path.exists():
        log_path.unlink()

    flops_per_token = model.flops_per_token()
    peak = cpu_matmul_peak(threads) if device.type == "cpu" else None
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * mcfg.context
    end = min(cfg.max_steps, stop_after) if stop_after else cfg.max_steps

    def log(record: dict[str, Any]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if on_step:
            on_step({**record, "max_steps": cfg.max_steps})

    if state["step"] == 0:
        log({"step": 0, "val_loss": validation_loss(model, val_windows, cfg, device), "tokens": 0})

    for step in range(state["step"], end):
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = []
        for _ in range(cfg.grad_accum_steps):
            batches.append(train_windows.batch(state["position"], cfg.micro_batch_size).to(device))
            state["position"] += cfg.micro_batch_size
        loss, grad_norm = train_step(model, opt, batches, cfg.grad_clip)
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {step + 1}; lower train.lr or raise train.warmup_steps")
        seconds = time.perf_counter() - started
        state["tokens"] += tokens_per_step
        state["seconds"] += seconds
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": state["tokens"],
            "tokens_per_s": tokens_per_step / seconds,
            "mfu": flops_per_token * tokens_per_step / seconds / peak if peak else None,
        }
        done = step + 1
        if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.max_steps:
            record["val_loss"] = validation_loss(model, val_windows, cfg, device)
        log(record)
        if _on_schedule(done, cfg) or done == end:
            checkpoint.save_checkpoint(ckpt_root, done, model, opt, state, keep_optimizer=cfg.keep_optimizer == "all")
        state["step"] = done

    if state["step"] < cfg.max_steps:
        return {"stopped_at": state["step"]}
    for ckpt in checkpoint.checkpoints(ckpt_root):  # an interruption's extra checkpoint is not part of the run
        if not _on_schedule(int(ckpt.name.removeprefix("step-")), cfg):
            shutil.rmtree(ckpt)
    save_model(model, out)
    return _summary(read_log(log_path), model, state, peak, flops_per_token)


def _summary(
    records: list[dict[str, Any]], model: Transformer, state: dict[str, Any], peak: float | None, flops_per_token: float
) -> dict[str, Any]:
    val_losses = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    steps = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_s"] for r in steps[len(steps) // 10 :]]
    tokens_per_s = float(np.median(speeds)) if speeds else None
    return {
        "steps": state["step"],
        "tokens": state["tokens"],
        "parameters": model.num_params(),
        "train_seconds": round(state["seconds"], 3),
        "final_loss": steps[-1]["loss"] if steps else None,
        "val_loss": val_losses[-1] if val_losses else None,
        "initial_val_loss": records[0].get("val_loss") if records else None,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak if peak and tokens_per_s else None,
        "matmul_peak_flops": peak,
    }
