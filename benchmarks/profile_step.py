"""Where a training step's time goes: torch.profiler over clearlm's step (forward, fused loss, backward,
optimizer), printed as the top operators by device time (CUDA) or CPU time.

    python benchmarks/profile_step.py --device cuda --precision bf16 --compile \\
        --vocab 50304 --d-model 768 --n-layers 12 --n-heads 12 --context 1024 --batch 16
"""

from __future__ import annotations

import argparse

import torch
from step_options import add_step_options, clearlm_step
from torch.profiler import ProfilerActivity, profile

from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.recipe import TrainConfig
from clearlm.train.loop import compile_blocks
from clearlm.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(ap)
    ap.add_argument("--architecture", choices=("llama", "olmo2"), default="llama")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after three warm-up steps)")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    cfg = TransformerConfig(vocab_size=args.vocab, architecture=args.architecture, d_model=args.d_model,
                            n_layers=args.n_layers, n_heads=args.n_heads, context=args.context)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(0)
    model.to(device).train()
    if args.compile and (message := compile_blocks(model, device)):
        raise SystemExit(message)
    opt = build_optimizer(model, TrainConfig())
    batch = torch.randint(0, cfg.vocab_size, (args.batch, cfg.context + 1), device=device)

    for _ in range(3):
        clearlm_step(model, opt, batch, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            clearlm_step(model, opt, batch, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
