"""clearlm's generation engine against transformers' `generate` on the same model folder, prompts and threads.

Greedy decoding in float32 of a fixed number of new tokens (end-of-text disabled on both sides, so both do the
same work), at batch 1 (prompts one after another) and batch 16 (prompts of different lengths, left-padded).
Prints new tokens per second of each, the ratio, and whether the generated tokens are identical. Each tool runs in
a process of its own with the MKL mode its users get: transformers MKL's default, clearlm its strict reproducible
mode (`clearlm.numerics`), which costs it bandwidth on one-row products. Runs alternate and the best of `--repeats`
is kept, so a slow phase of a shared machine hits both alike.

    python benchmarks/generate_vs_transformers.py                      # two random-weight Llama folders
    python benchmarks/generate_vs_transformers.py runs/quickstart/release --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from clearlm.model.generate import generate
from clearlm.model.hf import load_hf, save_hf
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.numerics import PEER_ENVIRONMENT, numerics

SIZES = {
    "quickstart-size (d192, 4 layers, vocab 4096)": TransformerConfig(
        vocab_size=4096, d_model=192, n_layers=4, n_heads=6, context=512
    ),
    "d512, 8 layers, GQA 8/2, vocab 32000": TransformerConfig(
        vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, context=1024
    ),
}


def _random_folder(cfg: TransformerConfig, folder: Path) -> Path:
    model = Transformer(cfg)
    model.init_weights(0)
    save_hf(model, folder, bos_id=0, eos_id=0, pad_id=1)
    return folder


def _prompts(vocab: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 64, (n,), generator=gen).tolist()
    return [[0, *torch.randint(2, vocab, (k - 1,), generator=gen).tolist()] for k in lengths]


def _transformers(hf: torch.nn.Module, prompts: list[list[int]], new: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=1)
    return out[:, width:].tolist()


def _worker(tool: str, folder: Path, batch: int, new: int) -> dict:
    """One tool's generation of the benchmark's prompts: a warm-up run, then a timed one."""
    prompts = _prompts(json.loads((folder / "config.json").read_text())["vocab_size"], 4 if batch == 1 else batch)
    if tool == "clearlm":
        ours = load_hf(folder).eval()

        def run() -> list[list[int]]:  # batch 1: the prompts one after another, in one call
            done = generate(ours, prompts, max_new_tokens=new, batch_size=batch, pad_id=1)
            return [c.tokens for c in done]
    else:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # a fixed number of new tokens on both sides

        def run() -> list[list[int]]:
            groups = [[p] for p in prompts] if batch == 1 else [prompts]
            return [t for g in groups for t in _transformers(hf, g, new)]

    run()
    started = time.perf_counter()
    tokens = run()
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "mkl": numerics().get("mkl_cbwr")}


def compare(folder: Path, batch: int, new: int, repeats: int, threads: int) -> dict:
    """Each tool in a process of its own, in the environment its users have (transformers: MKL's default mode;
    clearlm: its strict reproducible one), alternating, the best of `repeats` runs kept."""
    runs: dict[str, list[dict]] = {"clearlm": [], "transformers": []}
    for _ in range(repeats):
        for tool, extra in (("clearlm", {}), ("transformers", PEER_ENVIRONMENT)):
            out = subprocess.run([sys.executable, __file__, "--worker", tool, str(folder), str(batch), str(new),
                                  "--threads", str(threads)], env={**os.environ, **extra}, capture_output=True,
                                 text=True, check=True)  # fmt: skip
            runs[tool].append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = sum(map(len, runs["clearlm"][0]["tokens"]))  # every prompt's `new` tokens: end-of-text is off
    rate = {tool: tokens / min(r["seconds"] for r in rs) for tool, rs in runs.items()}
    return {
        "batch": batch, "new_tokens": new,
        "clearlm_tokens_per_s": round(rate["clearlm"], 1), "transformers_tokens_per_s": round(rate["transformers"], 1),
        "speedup": round(rate["clearlm"] / rate["transformers"], 2),
        "identical": runs["clearlm"][0]["tokens"] == runs["transformers"][0]["tokens"],
        "mkl": {tool: rs[0]["mkl"] for tool, rs in runs.items()},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="*", help="model folders (default: two random-weight Llamas)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", nargs=4, metavar=("TOOL", "FOLDER", "BATCH", "NEW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        tool, folder, batch, new = args.worker
        print(json.dumps(_worker(tool, Path(folder), int(batch), int(new))))
        return
    results = []
    with tempfile.TemporaryDirectory() as work:
        folders = {str(f): f for f in args.folders} or {
            name: _random_folder(cfg, Path(work) / str(i)) for i, (name, cfg) in enumerate(SIZES.items())
        }
        for name, folder in folders.items():
            for batch in (1, 16):
                row = {"model": name, **compare(folder, batch, args.new_tokens, args.repeats, args.threads)}
                results.append(row)
                print(f"{name} | batch {batch}: clearlm {row['clearlm_tokens_per_s']} tok/s, transformers "
                      f"{row['transformers_tokens_per_s']} tok/s, {row['speedup']}x, "
                      f"identical tokens: {row['identical']} (MKL mode: {row['mkl']})", flush=True)  # fmt: skip
    meta = {"threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
