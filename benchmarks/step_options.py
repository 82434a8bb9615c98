"""What the training-step benchmarks (`train_throughput.py`, `profile_step.py`) share: the options (the
model's dimensions, device, precision, compile), the autocast context they imply, and clearlm's step."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
from torch import nn

from clearlm.train.loop import accumulate_gradients, clip_gradients


def add_step_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=6)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile (clearlm: per block, as `train.compile`)")


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the chosen device for `--precision bf16`, else nothing."""
    if args.precision == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clearlm_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, args: argparse.Namespace) -> None:
    """One training step as `clearlm train` runs it: fused loss and backward, clipping at 1.0, optimizer step."""
    accumulate_gradients(model, [batch], autocast=autocast(args))
    clip_gradients(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
