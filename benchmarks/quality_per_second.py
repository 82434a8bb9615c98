"""Quality per CPU-second on Tiny Shakespeare: nanoGPT's CPU baseline against clearlm's shakespeare recipe.

Baseline: transformers' `GPT2LMHeadModel` with nanoGPT's README CPU settings (characters, 4 layers,
4 heads, 128 wide, context 64, batch 12, 2000 iterations, AdamW lr 1e-3 with 100 warmup steps and
cosine decay to 1e-4, betas (0.9, 0.99), weight decay 0.1, clipping 1.0, dropout 0), a plain loop.
Then clearlm runs `recipes/shakespeare.toml` for the same training wall-clock time: a short probe
measures its step time and `train.max_steps` is set so that training takes as long as the baseline's.
Both are scored on the same held-out text (the last 10 % of the file, from a line start) in bits per
byte, each token predicted from the preceding tokens of its window (64 characters for the baseline,
the recipe's context for clearlm). Data preparation and tokenizer training are not timed.

    python benchmarks/quality_per_second.py [--data ../shared/data/tinyshakespeare/input.txt]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from clearlm.numerics import keep_freed_memory
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def held_out_cut(text: str, fraction: float = 0.1) -> int:
    """Where the validation text starts: the first line start at or after 90 % (clearlm's tail_validation)."""
    cut = int(len(text) * (1 - fraction))
    return cut if text[cut - 1] == "\n" else text.find("\n", cut) + 1


def baseline(train: str, val: str, vocab: list[str], iters: int, threads: int) -> dict[str, float]:
    torch.manual_seed(1337)
    torch.set_num_threads(threads)
    stoi = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([stoi[c] for c in train], dtype=torch.long)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))  # fmt: skip
    started = time.perf_counter()
    for it in range(iters):
        lr = 1e-3 * (it + 1) / 100 if it < 100 else 1e-4 + 0.5 * (1e-3 - 1e-4) * (
            1 + math.cos(math.pi * (it - 100) / (iters - 100)))  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(data) - 64, (12,))
        x = torch.stack([data[i : i + 64] for i in ix])
        y = torch.stack([data[i + 1 : i + 65] for i in ix])
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    ids = torch.tensor([stoi[c] for c in val], dtype=torch.long)
    rows = [ids[i : i + 65] for i in range(0, len(ids) - 1, 64)]  # every character but the first is predicted
    short = [r[None] for r in rows if len(r) < 65]  # the last window may be shorter
    full = [r for r in rows if len(r) == 65]
    nll, model = 0.0, model.eval()
    with torch.no_grad():
        for batch in [torch.stack(full[i : i + 64]) for i in range(0, len(full), 64)] + short:
            logits = model(input_ids=batch[:, :-1]).logits
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].reshape(-1), reduction="sum").item()
    return {"seconds": seconds, "bits_per_byte": nll / math.log(2) / len(val.encode()), "steps": iters}


def clearlm_run(data: Path, seconds: float, work: Path, probe_steps: int, overrides: list[str]) -> dict[str, float]:
    shutil.copy(ROOT / "recipes" / "shakespeare.toml", work / "shakespeare.toml")
    (work / "tinyshakespeare").mkdir(exist_ok=True)
    shutil.copy(data, work / "tinyshakespeare" / "input.txt")
    probe = Pipeline(load_recipe(work / "shakespeare.toml", [*overrides, f"train.max_steps={probe_steps}"]),
                     work / "runs")  # fmt: skip
    art = probe.run("train")
    log = [json.loads(line) for line in (art.path / "log.jsonl").read_text().splitlines()]
    timed = [r for r in log[probe_steps // 4 :] if "loss" in r]
    step_seconds = statistics.mean(r["tokens"] / r["step"] / r["tokens_per_s"] for r in timed)
    steps = max(1, int(0.97 * seconds / step_seconds))  # a small margin: a long run slows a little
    pipe = Pipeline(load_recipe(work / "shakespeare.toml", [*overrides, f"train.max_steps={steps}"]), work / "runs")
    evaluation = pipe.run("eval")
    train = pipe.artifacts["train"].metrics
    return {"seconds": train["train_seconds"], "bits_per_byte": evaluation.metrics["bits_per_byte"]["all"][
        "bits_per_byte"], "steps": steps, "tokens": train["tokens"], "tokens_per_s": train["tokens_per_s"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
    ap.add_argument("--iters", type=int, default=2000, help="baseline iterations (nanoGPT's README: 2000)")
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--set", action="append", default=[], help="override a value of the clearlm recipe")
    ap.add_argument("--baseline-seconds", type=float, help="skip the baseline; give clearlm this much time")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    keep_freed_memory()  # as clearlm train does; it only helps the baseline too
    text = args.data.read_text()
    cut = held_out_cut(text)
    if args.baseline_seconds:
        base = {"seconds": args.baseline_seconds, "bits_per_byte": float("nan"), "steps": 0}
    else:
        base = baseline(text[:cut], text[cut:], sorted(set(text)), args.iters, args.threads)
    print(f"baseline (transformers GPT2LMHeadModel, nanoGPT CPU settings): {base['bits_per_byte']:.4f} bits/byte "
          f"after {base['steps']} steps in {base['seconds']:.1f} s")  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        ours = clearlm_run(args.data, base["seconds"], Path(work), args.probe_steps, args.set)
    print(f"clearlm (recipes/shakespeare.toml): {ours['bits_per_byte']:.4f} bits/byte after {ours['steps']} steps "
          f"in {ours['seconds']:.1f} s ({ours['tokens_per_s']:,.0f} tokens/s)")  # fmt: skip
    print(f"bits/byte: clearlm {ours['bits_per_byte']:.4f} vs baseline {base['bits_per_byte']:.4f} "
          f"(difference {ours['bits_per_byte'] - base['bits_per_byte']:+.4f}); "
          f"training time ratio {ours['seconds'] / base['seconds']:.3f}")  # fmt: skip
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                   "torch": torch.__version__}  # fmt: skip
        Path(args.json).write_text(json.dumps({"baseline": base, "clearlm": ours, "machine": machine}, indent=2))


if __name__ == "__main__":
    main()
