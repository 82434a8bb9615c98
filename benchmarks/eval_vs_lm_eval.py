"""clearlm's task evaluation against lm-evaluation-harness on the same model, files and prompts.

Exports the tasks as lm-eval YAMLs over the same local files, runs lm-eval's `hf` model and clearlm
in the same process, and prints per-task metrics side by side, the largest per-item log-likelihood
difference and the wall-time ratio.

    python benchmarks/eval_vs_lm_eval.py runs/quickstart/release --data-dir ../shared/data \\
        --tasks arc_easy,piqa,winogrande,hellaswag --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from lm_eval_export import run_lm_eval

from clearlm.eval.harness import evaluate_tasks
from clearlm.eval.taskspec import resolve_tasks
from clearlm.release.load import bos_token_id, load_release


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--tasks", default="arc_easy,piqa,winogrande,hellaswag")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = resolve_tasks(args.tasks.split(","), [])
    if any(s.output_type == "generate" for s in specs):
        ap.error("generation tasks have no log-likelihoods to compare; pick log-likelihood tasks")

    with tempfile.TemporaryDirectory() as work:
        # One item per task is lm-eval's fixed cost (task index, datasets, model load). It is timed on a second
        # such run: the first also builds caches and imports that the full run then finds ready.
        run_lm_eval(args.model, specs, args.data_dir, Path(work) / "cold", 1, args.batch_size)
        started = time.perf_counter()
        run_lm_eval(args.model, specs, args.data_dir, Path(work) / "warm", 1, args.batch_size)
        lm_eval_fixed_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = run_lm_eval(args.model, specs, args.data_dir, Path(work) / "run", args.limit, args.batch_size)
        lm_eval_s = time.perf_counter() - started

    started = time.perf_counter()
    model, tok, eos = load_release(args.model)
    ours, samples = evaluate_tasks(
        model, tok, specs, args.data_dir, prefix_id=bos_token_id(args.model, eos), limit=args.limit,
        batch_size=args.batch_size,
    )  # fmt: skip
    clearlm_s = time.perf_counter() - started

    report = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads", "tasks": {}}
    print(f"{'task':<16}{'metric':<10}{'clearlm':>12}{'lm-eval':>12}   max |dLL|")
    for spec in specs:
        mine = [s.get("loglikelihoods", [s.get("loglikelihood")]) for s in samples if s["task"] == spec.name]
        other = theirs[spec.name]["loglikelihoods"]
        diffs = [abs(a - b) for x, y in zip(mine, other, strict=True) for a, b in zip(x, y, strict=True)]
        max_diff = max(diffs) if diffs else float("nan")
        report["tasks"][spec.name] = {"clearlm": ours[spec.name], "lm_eval": theirs[spec.name]["metrics"],
                                      "max_loglikelihood_diff": max_diff}  # fmt: skip
        for metric in spec.metrics:
            a, b = ours[spec.name][metric], theirs[spec.name]["metrics"].get(metric, float("nan"))
            form = ".4f" if max(abs(a), abs(b)) < 1e5 else ".4e"  # perplexities of an untrained model are huge
            print(f"{spec.name:<16}{metric:<10}{a:>12{form}}{b:>12{form}}   {max_diff:.2e}")
    report |= {"clearlm_seconds": clearlm_s, "lm_eval_seconds": lm_eval_s, "speedup": lm_eval_s / clearlm_s,
               "lm_eval_fixed_seconds": lm_eval_fixed_s}  # fmt: skip
    print(f"wall time: clearlm {clearlm_s:.1f} s, lm-eval {lm_eval_s:.1f} s -> {lm_eval_s / clearlm_s:.2f}x")
    net = lm_eval_s - lm_eval_fixed_s
    print(f"lm-eval without its fixed cost ({lm_eval_fixed_s:.1f} s for 1 item per task): {net:.1f} s -> "
          f"{net / clearlm_s:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
