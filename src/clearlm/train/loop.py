"""The pretraining loop: a short loop in nanoGPT's spirit, with exact resume.

The data position (windows consumed), the optimizer state, the RNG and the step are the whole
state; restoring them continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
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
import torch.distributed as dist
from torch import nn

from clearlm.data.shards import WindowSampler, open_tokens, window_documents
from clearlm.errors import InputError, RecipeError
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.model.weights import MODEL_CONFIG, WEIGHTS
from clearlm.recipe import Recipe, TrainConfig
from clearlm.stages import StageRun
from clearlm.train import checkpoint, checkpoint_files
from clearlm.train.distributed import check_supported, sync_gradients, wrap
from clearlm.train.guard import LossGuard
from clearlm.train.optim import build_optimizer, lr_factor, set_lr
from clearlm.train.perf import device_peak_flops
from clearlm.world import SINGLE, World, barrier

LOG = "log.jsonl"
StepCallback = Callable[[dict[str, Any]], None]


def model_config(recipe: Recipe, vocab_size: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab_size, **recipe.model.model_dump())


def pick_device(cfg: TrainConfig, w: World = SINGLE) -> torch.device:
    """The recipe's device; under torchrun on GPUs, this rank's GPU."""
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is 'cuda' but this torch build sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device("cuda", w.local_rank) if kind == "cuda" else torch.device("cpu")


def accumulate_gradients(
    engine: nn.Module, micro_batches: list[torch.Tensor], w: World = SINGLE, z_loss: float = 0.0,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[float, float]:  # fmt: skip
    """Backward over this rank's micro-batches of [B, T+1] ids with the loss averaged over the target tokens
    of the whole global batch (all micro-batches of all ranks); returns (mean cross-entropy, mean z-loss).

    Each micro-batch's summed loss is divided by the global token count, so micro-batches weigh by their
    tokens exactly as one large batch would; DDP and FSDP2 average gradients over ranks, so it is scaled
    by the world size. The gradient all-reduce runs once, on the last micro-batch."""
    n_targets = sum(b[:, 1:].numel() for b in micro_batches) * w.size
    totals = torch.zeros(2, dtype=torch.float64, device=micro_batches[0].device)  # read once: one GPU sync
    for i, batch in enumerate(micro_batches):
        sync_gradients(engine, i == len(micro_batches) - 1)
        with autocast or contextlib.nullcontext():
            loss, z = engine(batch[:, :-1], targets=batch[:, 1:], z_loss=z_loss)
        (loss * (w.size / n_targets)).backward()
        totals += torch.stack([loss.detach(), z]).double()
    if w.distributed:
        dist.all_reduce(totals)
    total, z_total = (totals / n_targets).tolist()
    return total - z_total, z_total


def clip_gradients(model: nn.Module, grad_clip: float) -> float:
    """Clip (0 = no clipping); returns the pre-clipping gradient norm, seen before the optimizer steps."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def compile_blocks(model: Transformer, device: torch.device) -> str | None:
    """torch.compile each block (as torchtitan does) and, on GPUs, the elementwise work of each loss chunk (the
    loss is a custom autograd function whose matmuls stay eager). On CPU the compiled loss chunk measured ~7 %
    slower per step than eager (whose in-place passes stay in cache), so it is left eager there.
    A tiny function is compiled first, so that a platform without a working compiler toolchain gives a
    message and eager training instead of a failure at the first step."""
    try:
        probe = torch.compile(lambda a: torch.relu(a @ a) + 1)
        probe(torch.ones(8, 8, device=device))
    except Exception as err:  # any compiler failure means: train eagerly
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return f"train.compile: torch.compile does not work here ({type(err).__name__}: {first}); training without it"
    for block in model.layers:
        block.compile()
    model.compile_loss = device.type == "cuda"
    return None


@torch.no_grad()
def validation_loss(
    engine: nn.Module, sampler: WindowSampler, cfg: TrainConfig, device: torch.device,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> float:  # fmt: skip
    """Mean cross-entropy over the first `eval_batches` validation batches (every rank computes all of them:
    under FSDP2 each forward is collective)."""
    engine.eval()
    total, count = 0.0, 0
    for i in range(cfg.eval_batches):
        batch = sampler.sequential(i * cfg.micro_batch_size, cfg.micro_batch_size).to(device)
        with autocast or contextlib.nullcontext():
            total += engine(batch[:, :-1], targets=batch[:, 1:])[0].item()
        count += batch[:, 1:].numel()
    engine.train()
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
    """Keep the records up to `step` (the checkpoint resumed from), each line as it was written (a line torn by a
    crash goes), written atomically."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _sampler(shards_dir: Path, split: str, dtype: str, context: int, seed: int) -> WindowSampler:
    tokens = open_tokens(shards_dir, split, dtype)
    if len(tokens) < context + 1:
        raise InputError(
            f"the {split} split has {len(tokens)} tokens, fewer than one window of model.context + 1 = "
            f"{context + 1}: lower model.context or add data"
        )
    return WindowSampler(tokens, context, seed)


def _describe_batch(windows: WindowSampler, shards_dir: Path, first: int, count: int) -> str:
    spans = [windows.span(position) for position in range(first, first + count)]
    ids = window_documents(shards_dir, "train", spans)
    shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
    return f"training windows {first}-{first + count - 1} of the shuffled stream, {len(ids)} documents ({shown})"


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
    on_note: Callable[[str], None] | None = None,
    w: World = SINGLE,
    cfg: TrainConfig | None = None,
    seed: int | None = None,
    model_cfg: TransformerConfig | None = None,
    start: Callable[[Transformer, torch.optim.Optimizer], None] | None = None,
    section: str = "train",
) -> dict[str, Any]:
    """Train from scratch (or resume) into `out`; return summary metrics. Stops early at `stop_after`.

    Under torchrun every rank calls this with the same `out`; rank 0 writes the log, the checkpoints and
    the model, the others only compute. It runs with the process's thread count: the pipeline sets it for the
    stage (`clearlm.numerics.begin_stage`). Another stage that trains on tokens (mid-training) passes its
    own settings (`cfg` from its recipe `section`, `seed`: the data order, `model_cfg`) and `start`, which
    loads the weights (and optimizer state) it starts from; a resumed run's checkpoint then replaces them."""
    cfg = cfg or recipe.train
    seed = recipe.seed if seed is None else seed
    device = pick_device(cfg, w)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    check_supported(cfg, w)
    note = on_note or (lambda _: None)
    if cfg.distributed == "fsdp2" and not w.distributed and w.main:
        note('train.distributed = "fsdp2" applies under torchrun with 2 or more processes; training in one process')
    torch.manual_seed(seed)

    mcfg = model_cfg or model_config(recipe, vocab_size)
    model = Transformer(mcfg)
    model.init_weights(seed)
    model.to(device).train()
    model.checkpoint_blocks = cfg.activation_checkpointing
    compiled = cfg.compile
    if cfg.compile:
        message = compile_blocks(model, device)
        if message:
            compiled = False
            if w.main:
                note(message)
    engine = wrap(model, cfg.distributed, w, device)
    opt = build_optimizer(model, cfg, w)
    if start is not None:
        start(model, opt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else None
    dtype = shards_meta["dtype"]
    train_windows = _sampler(shards_dir, "train", dtype, mcfg.context, seed)
    val_windows = _sampler(shards_dir, "validation", dtype, mcfg.context, seed)

    ckpt_root, log_path = out / "checkpoints", out / LOG
    state: dict[str, Any] = {"step": 0, "position": 0, "tokens": 0, "seconds": 0.0}
    found = checkpoint_files.latest_checkpoint(ckpt_root) if resume else None
    if found:
        state = {**state, **checkpoint.load_checkpoint(found, model, opt)}
        state.pop("param_groups", None)
        if w.main:
            truncate_log(log_path, state["step"])
    elif log_path.exists() and w.main:
        log_path.unlink()
    barrier(w)
    guard = LossGuard(cfg.spike_factor, section, read_log(log_path) if found else [], ckpt_root)

    flops_per_token = model.flops_per_token()
    peak = device_peak_flops(device, torch.get_num_threads(), cfg.peak_flops)
    windows_per_step = cfg.micro_batch_size * cfg.grad_accum_steps
    tokens_per_step = windows_per_step * mcfg.context
    end = min(cfg.max_steps, stop_after) if stop_after else cfg.max_steps

    def log(record: dict[str, Any]) -> None:
        if not w.main:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if on_step:
            on_step({**record, "max_steps": cfg.max_steps})

    def evaluate() -> float:
        return validation_loss(engine, val_windows, cfg, device, autocast)

    if state["step"] == 0:
        log({"step": 0, "val_loss": evaluate(), "tokens": 0})

    for step in range(state["step"], end):
        started = time.perf_counter()
        factor = lr_factor(step, cfg)
        set_lr(opt, factor)
        batches = []
        for k in range(cfg.grad_accum_steps // w.size):  # micro-batch k of rank r: the (k * world + r)-th slice
            first = state["position"] + (k * w.size + w.rank) * cfg.micro_batch_size
            batches.append(train_windows.batch(first, cfg.micro_batch_size).to(device, non_blocking=True))
        state["position"] += windows_per_step
        loss, z = accumulate_gradients(engine, batches, w, cfg.z_loss, autocast)
        grad_norm = clip_gradients(model, cfg.grad_clip)
        taken = state["position"] - windows_per_step
        guard.check(step + 1, loss, grad_norm, cfg.lr * factor,
                    lambda: _describe_batch(train_windows, shards_dir, taken, windows_per_step))  # noqa: B023  # fmt: skip
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        state["tokens"] += tokens_per_step
        state["seconds"] += seconds
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": loss,
            **({"z_loss": z} if cfg.z_loss else {}),
            "lr": cfg.lr * factor,
            "grad_norm": grad_norm,
            "tokens": state["tokens"],
            "tokens_per_s": tokens_per_step / seconds,
            "mfu": flops_per_token * tokens_per_step / seconds / (peak * w.size) if peak else None,
        }
        done = step + 1
        if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.max_steps:
            record["val_loss"] = evaluate()
        log(record)
        if _on_schedule(done, cfg) or done == end:
            checkpoint.save_checkpoint(ckpt_root, done, model, opt, state,
                                       keep_optimizer=cfg.keep_optimizer == "all", w=w)  # fmt: skip
        state["step"] = done

    barrier(w)
    if state["step"] < cfg.max_steps:
        return {"stopped_at": state["step"]}
    if not w.main:
        return {}
    for ckpt in checkpoint_files.checkpoints(ckpt_root):  # an interruption's extra checkpoint is not part of the run
        if not _on_schedule(int(ckpt.name.removeprefix("step-")), cfg):
            shutil.rmtree(ckpt)
    final = checkpoint_files.checkpoint_dir(ckpt_root, cfg.max_steps) / WEIGHTS  # the full weights, even under FSDP2
    shutil.copy2(final, out / WEIGHTS)
    (out / MODEL_CONFIG).write_text(json.dumps(mcfg.to_dict(), indent=2) + "\n")
    summary = _summary(read_log(log_path), model, state, peak, flops_per_token, w.size)
    return {**summary, "compiled": compiled, "world_size": w.size, "device": device.type}


def _summary(
    records: list[dict[str, Any]],
    model: Transformer,
    state: dict[str, Any],
    peak: float | None,
    flops_per_token: float,
    world_size: int,
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
        "mfu": flops_per_token * tokens_per_s / (peak * world_size) if peak and tokens_per_s else None,
        "peak_flops": peak,
    }


def build_stage(run: StageRun, out: Path) -> dict[str, Any] | None:
    """The pretraining stage (on every torchrun rank: rank 0 writes, the others compute); None when stopped."""
    shards, tok = run.inputs["shards"], run.inputs["tokenizer"]
    metrics = pretrain(run.recipe, shards.path, shards.metrics, tok.metrics["vocab_size"], out, resume=run.resume,
                       stop_after=run.stop_after, on_step=run.reporter.train_step, on_note=run.reporter.note,
                       w=run.world)  # fmt: skip
    return None if "stopped_at" in metrics else metrics
