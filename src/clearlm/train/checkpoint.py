"""Checkpoints: safetensors weights, optimizer state and RNG, plus a JSON trainer state.

Everything is stored without pickle, so a release's checkpoints are safe to open anywhere. A
checkpoint directory is written under a temporary name and renamed, so a crash never leaves a
half-written checkpoint that resume would pick up.

The state is taken and restored through `torch.distributed.checkpoint.state_dict` as full (unsharded)
tensors keyed by parameter name: the same files come from one process, DDP or FSDP2, so a run saved
with any number of processes resumes with any other (the data position is global, too). Every rank
takes part in gathering the state; rank 0 writes it.
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from clearlm.model.weights import WEIGHTS, save_state, tied

OPTIMIZER, STATE = "optimizer.safetensors", "state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, opt, options=options)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_optimizer: bool,
    main: bool = True,
) -> Path:
    """Write checkpoint `step` (every rank must call this; only `main` writes)."""
    weights, optim = _full_state(model, opt)
    final = checkpoint_dir(root, step)
    if not main:
        return final
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_state(weights, tmp / WEIGHTS, tied(model))
    tensors = {f"state.{name}.{key}": torch.as_tensor(value).detach().to("cpu").contiguous()
               for name, entry in optim["state"].items() for key, value in entry.items()}  # fmt: skip
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / OPTIMIZER))
    (tmp / STATE).write_text(
        json.dumps({**state, "step": step, "param_groups": optim["param_groups"]}, indent=2) + "\n"
    )
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
    """Restore weights, optimizer state and RNG (every rank reads the files) and return the trainer state."""
    state = json.loads((path / STATE).read_text())
    weights = load_file(str(path / WEIGHTS))
    if tied(model):
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    tensors = load_file(str(path / OPTIMIZER))
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            param, key = name.removeprefix("state.").rsplit(".", 1)
            per_param.setdefault(param, {})[key] = value
    optim = {"state": per_param, "param_groups": state["param_groups"]}
    set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=True))  # fmt: skip
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
