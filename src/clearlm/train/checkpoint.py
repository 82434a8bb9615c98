"""Checkpoints: safetensors weights, optimizer state and RNG, plus a JSON trainer state.

Everything is stored without pickle, so a release's checkpoints are safe to open anywhere. A
checkpoint directory is written under a temporary name and renamed, so a crash never leaves a
half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clearlm.model.weights import WEIGHTS, load_weights, save_weights

OPTIMIZER, STATE = "optimizer.safetensors", "state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {
        f"state.{idx}.{key}": value.detach().to("cpu").contiguous()
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    return tensors, sd["param_groups"]


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_optimizer: bool,
) -> Path:
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / WEIGHTS)
    tensors, groups = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / OPTIMIZER))
    (tmp / STATE).write_text(json.dumps({**state, "step": step, "param_groups": groups}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if not keep_optimizer:
        for older in root.glob("step-*"):
            if older != final and (older / OPTIMIZER).exists():
                (older / OPTIMIZER).unlink()
    return final


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (never a half-written `.tmp` one)."""
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE).exists())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that can be resumed from (has optimizer state)."""
    done = [p for p in checkpoints(root) if (p / OPTIMIZER).exists()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    load_weights(model, path / WEIGHTS)
    state = json.loads((path / STATE).read_text())
    tensors = load_file(str(path / OPTIMIZER))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
