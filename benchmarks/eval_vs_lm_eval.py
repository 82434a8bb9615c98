"""clearlm's task evaluation against lm-evaluation-harness on the same model, files and prompts.

Log-likelihood tasks are exported as lm-eval YAMLs over the same local files; the generative and safety tasks
(gsm8k, humaneval, mbpp, ifeval, truthfulqa, crows_pairs, bbq) run lm-eval's own configs pointed at the local files.
lm-eval's `hf` model runs in a process of its own with MKL's default mode, as its users run it (clearlm's strict
reproducible mode would slow its one-row products); the script prints per-task metrics side by side, the
largest per-item log-likelihood difference or the number of identical generations, and the wall-time ratio with
lm-eval's fixed start-up cost (a one-item run) shown separately. Both are timed warm, after a one-item run of every
task in the same process.

    python benchmarks/eval_vs_lm_eval.py runs/quickstart/release --data-dir ../shared/data \\
        --tasks arc_easy,piqa,winogrande,hellaswag --limit 200
    python benchmarks/eval_vs_lm_eval.py runs/quickstart/release --data-dir ../shared/data --context 2048 \\
        --tasks gsm8k,humaneval,mbpp,ifeval,truthfulqa_mc2,crows_pairs_english,bbq --limit 20 --max-gen-tokens 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lm_eval_export import NATIVE_TASKS, long_context_copy, run_lm_eval, run_lm_eval_native

from clearlm.eval.harness import evaluate_tasks
from clearlm.eval.taskspec import TaskSpec, capped, resolve_tasks
from clearlm.numerics import PEER_ENVIRONMENT
from clearlm.release.load import bos_token_id, load_release


def _lm_eval(model: Path, specs: list[TaskSpec], data_dir: Path, work: Path, limit: int, batch: int) -> dict:
    native = [s for s in specs if s.name in NATIVE_TASKS]
    exported = [s for s in specs if s.name not in NATIVE_TASKS]
    out = run_lm_eval(model, exported, data_dir, work / "exported", limit, batch) if exported else {}
    return out | (run_lm_eval_native(model, native, data_dir, work / "native", limit, batch) if native else {})


def _lm_eval_timed(model: Path, specs: list[TaskSpec], data_dir: Path, work: Path, limit: int, batch: int) -> dict:
    """lm-eval's results and wall time, and its fixed cost: one item per task, timed on a second such run (the first
    also builds caches and imports that the full run then finds ready)."""
    _lm_eval(model, specs, data_dir, work / "cold", 1, batch)
    started = time.perf_counter()
    _lm_eval(model, specs, data_dir, work / "warm", 1, batch)
    fixed_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = _lm_eval(model, specs, data_dir, work / "run", limit, batch)
    return {"results": theirs, "seconds": time.perf_counter() - started, "fixed_seconds": fixed_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--tasks", default="arc_easy,piqa,winogrande,hellaswag")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-gen-tokens", type=int, help="cap generative tasks' token budget (both harnesses)")
    ap.add_argument("--context", type=int, help="evaluate a random-weight copy with this context and the model's "
                    "tokenizer (generative tasks' prompts need more than the quickstart's 256 tokens)")  # fmt: skip
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--lm-eval-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = capped(resolve_tasks(args.tasks.split(","), []), args.max_gen_tokens)
    if args.lm_eval_worker:
        out = _lm_eval_timed(args.model, specs, args.data_dir, args.lm_eval_worker.parent, args.limit, args.batch_size)
        args.lm_eval_worker.write_text(json.dumps(out))
        return

    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model  # with --context: a quickstart-sized random model with the release's tokenizer
        if args.context:
            model_dir = long_context_copy(args.model, Path(work) / "model", args.context, d_model=192, n_layers=4)
        worker = [sys.executable, __file__, str(model_dir), "--data-dir", str(args.data_dir), "--tasks", args.tasks,
                  "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                  "--lm-eval-worker", str(Path(work) / "lm-eval" / "out.json")]  # fmt: skip
        if args.max_gen_tokens:
            worker += ["--max-gen-tokens", str(args.max_gen_tokens)]
        (Path(work) / "lm-eval").mkdir()
        subprocess.run(worker, env={**os.environ, **PEER_ENVIRONMENT}, check=True)
        lm_eval = json.loads((Path(work) / "lm-eval" / "out.json").read_text())
        theirs, lm_eval_s, lm_eval_fixed_s = lm_eval["results"], lm_eval["seconds"], lm_eval["fixed_seconds"]

        # clearlm is timed warm too: a one-item run of every task first (imports such as NLTK's 1-2 s, caches), as
        # lm-eval's timed run follows its one-item runs in the same process
        started = time.perf_counter()
        model, tok, eos = load_release(model_dir)
        prefix_id = bos_token_id(model_dir, eos)
        evaluate_tasks(model, tok, specs, args.data_dir, prefix_id=prefix_id, eos_id=eos, limit=1,
                       batch_size=args.batch_size)  # fmt: skip
        clearlm_fixed_s = time.perf_counter() - started
        ours, samples, task_s = {}, [], {}
        for spec in specs:  # one task at a time, to time each
            task_started = time.perf_counter()
            metrics, rows = evaluate_tasks(model, tok, [spec], args.data_dir, prefix_id=prefix_id, eos_id=eos,
                                           limit=args.limit, batch_size=args.batch_size)  # fmt: skip
            ours, samples, task_s[spec.name] = ours | metrics, samples + rows, time.perf_counter() - task_started
        clearlm_s = sum(task_s.values())

    report = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads", "tasks": {}}
    print(f"{'task':<22}{'metric':<34}{'clearlm':>10}{'lm-eval':>10}   agreement")
    for spec in specs:
        mine = [s for s in samples if s["task"] == spec.name]
        other = theirs[spec.name]
        if spec.output_type == "generate":
            same = sum(m["generations"][0] == t for m, t in zip(mine, other["generations"], strict=True))
            agreement = f"{same}/{len(mine)} generations identical"
        else:
            diffs = [abs(a - b) for m, t in zip(mine, other["loglikelihoods"], strict=True)
                     for a, b in zip(m.get("loglikelihoods", [m.get("loglikelihood")]), t, strict=True)]  # fmt: skip
            agreement = f"max |dLL| {max(diffs, default=math.nan):.2e}"
        if spec.name in ("humaneval", "mbpp"):
            agreement += " (pass@1 of lm-eval's generations run in clearlm's sandbox)"
        report["tasks"][spec.name] = {"clearlm": ours[spec.name], "lm_eval": other["metrics"], "agreement": agreement}
        for metric, b in other["metrics"].items():
            a = ours[spec.name].get(metric, math.nan)
            form = ".4f" if max(abs(a), abs(b)) < 1e5 else ".4e"  # perplexities of an untrained model are huge
            print(f"{spec.name:<22}{metric:<34}{a:>10{form}}{b:>10{form}}   {agreement}")
    report |= {"clearlm_seconds": clearlm_s, "lm_eval_seconds": lm_eval_s, "speedup": lm_eval_s / clearlm_s,
               "lm_eval_fixed_seconds": lm_eval_fixed_s, "clearlm_fixed_seconds": clearlm_fixed_s,
               "clearlm_task_seconds": task_s}  # fmt: skip
    print("clearlm per task: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in task_s.items()))
    print(
        f"wall time: clearlm {clearlm_s:.1f} s, lm-eval {lm_eval_s:.1f} s -> {lm_eval_s / clearlm_s:.2f}x (each "
        f"after a one-item run of every task: clearlm's took {clearlm_fixed_s:.1f} s, model load included)"
    )
    net = lm_eval_s - lm_eval_fixed_s
    print(f"lm-eval without its fixed cost ({lm_eval_fixed_s:.1f} s for 1 item per task): {net:.1f} s -> "
          f"{net / clearlm_s:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
