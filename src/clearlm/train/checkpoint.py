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

WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights under clearlm's names; tied tensors are stored once (safetensors forbids sharing)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to("cpu").contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    tied = {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")


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


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that can be resumed from (has optimizer state)."""
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / OPTIMIZER).exists())
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
