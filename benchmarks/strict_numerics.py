"""What MKL's strict reproducible mode costs, and what it buys: clearlm sets `MKL_CBWR=AUTO,STRICT` (see
`clearlm/numerics.py`); this times quickstart-sized training steps with it and with MKL's default, and checks
whether the weights after those steps depend on the thread count in each mode.

Each measurement is a fresh process (MKL reads the mode once, at its first call), rounds alternate so that
machine noise hits both modes alike, and the best round of each is kept.

    python benchmarks/strict_numerics.py [--rounds 3 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from clearlm.numerics import available_cpus

STEP = """
import hashlib, json, sys, time
import torch
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.numerics import begin_stage, numerics
from clearlm.recipe import TrainConfig
from clearlm.train.loop import accumulate_gradients, clip_gradients
from clearlm.train.optim import build_optimizer

threads, steps = int(sys.argv[1]), int(sys.argv[2])
begin_stage(threads)
cfg = TransformerConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, context=256)
model = Transformer(cfg)
model.init_weights(0)
opt = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.03, lr=3e-3))
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 4096, (16, 257), generator=gen) for _ in range(steps + 2)]
for i, batch in enumerate(batches):
    if i == 2:  # two warm-up steps
        started = time.perf_counter()
    accumulate_gradients(model, [batch])
    clip_gradients(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
seconds = (time.perf_counter() - started) / steps
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
print(json.dumps({"mode": numerics().get("mkl_cbwr"), "seconds": seconds, "weights": digest}))
"""

MODES = {"strict (clearlm)": "AUTO,STRICT", "MKL default": ""}  # empty: clearlm leaves MKL's default


def measure(mode: str, threads: int, steps: int) -> dict:
    env = {**os.environ, "MKL_CBWR": mode}
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=available_cpus())
    args = ap.parse_args()
    best: dict[str, float] = {}
    seen: dict[str, str] = {}
    weights: dict[str, set[tuple[int, str]]] = {name: set() for name in MODES}  # (threads, digest) of every run
    for _ in range(args.rounds):
        for name, mode in MODES.items():
            result = measure(mode, args.threads, args.steps)
            best[name] = min(best.get(name, float("inf")), result["seconds"])
            seen[name] = result["mode"]
            weights[name].add((args.threads, result["weights"]))
    for name, mode in MODES.items():
        weights[name].add((1, measure(mode, 1, args.steps)["weights"]))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    print(f"machine: {machine}; quickstart model (d 192, 4 layers, context 256, batch 16, Muon), "
          f"{args.steps} steps, best of {args.rounds} rounds")  # fmt: skip
    print(f"{'MKL mode':<30} {'s/step':>8} {'vs default':>10}  weights of every round, 1 and {args.threads} threads")
    for name in MODES:
        same = "identical" if len({digest for _, digest in weights[name]}) == 1 else "differ"
        label = f"{name} ({seen[name]})"
        print(f"{label:<30} {best[name]:8.3f} {best[name] / best['MKL default']:9.2f}x  {same}")


if __name__ == "__main__":
    main()
