"""GRPO steps: clearlm's RLVR stage against TRL's GRPOTrainer on the same model, prompts, verifier and settings.

The model is the quickstart's shape (Llama, 192 wide, 4 layers, vocabulary 4096, context 256), randomly initialised,
float32 on CPU with the same thread count, TRL's bf16 and gradient checkpointing off. Prompts: the built-in "write
this standard-library function" requests (chat messages); reward: clearlm's `python_parses` verifier (TRL calls it as
a reward function); `num_generations` completions of `--prompts` prompts per step, sampled at temperature 1 up to
`--length` new tokens, one optimization pass per generation batch, loss "dapo" (TRL's default). Each tool runs in a
fresh process; prints steps/s, completion tokens/s (sampled tokens per second of whole steps: generation, reward and
the optimizer step), the ratio and peak RSS.

    python benchmarks/rlvr_vs_trl.py --steps 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from posttrain_vs_trl import CONTEXT, hf_copy, quickstart_model, worker_environment


def _setup(workdir: Path, n: int):
    from clearlm.data.instructions import stdlib_function_prompts

    tok, model, corpus = quickstart_model(workdir)
    return tok, model, stdlib_function_prompts(corpus, n)


SCORED: list[list] = []  # the prompts TRL passes to the reward function, batch by batch


def _parses(prompts, completions, **kw):
    from clearlm.verifiers.python_parses import verify

    SCORED.append(prompts)
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return verify(texts, [{} for _ in texts])


def run(tool: str, steps: int, prompts: int, generations: int, length: int, workdir: Path) -> dict:
    import torch
    import torch._dynamo  # a first optimizer imports it (1 s here); TRL's imports load it before its timer

    torch.set_num_threads(2)
    tok, model, rows = _setup(workdir, steps * prompts)
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    if tool == "trl":
        import datasets
        import trl

        hf_model, hf_tok = hf_copy(tok, model, workdir / "hf")
        args = trl.GRPOConfig(
            output_dir=str(workdir / "out"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", max_steps=steps, logging_steps=1, learning_rate=1e-5, seed=0,
            dataloader_num_workers=0, disable_tqdm=True, per_device_train_batch_size=prompts * generations,
            num_generations=generations, max_completion_length=length, temperature=1.0, shuffle_dataset=False,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(model=hf_model, reward_funcs=[_parses], args=args,
                                  train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
                                  processing_class=hf_tok)  # fmt: skip
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        groups = [batch[i : i + generations] for batch in SCORED for i in range(0, len(batch), generations)]
        assert all(len({json.dumps(p) for p in g}) == 1 for g in groups), "TRL's groups mix prompts"
        assert [len(batch) for batch in SCORED] == [prompts * generations] * steps, "TRL scored other batches"
        log = [h for h in trainer.state.log_history if "completions/mean_length" in h]
        tokens = sum(h["completions/mean_length"] * prompts * generations for h in log)
        rewards = [h["reward"] for h in log]
    else:
        from clearlm.data.chat import ChatTemplate
        from clearlm.recipe import RLVRConfig
        from clearlm.train.rlvr import Sampler, prepare_prompts, train_rlvr
        from clearlm.verifiers import load

        cfg = RLVRConfig(builtin="stdlib-functions", verifiers=[{"name": "python_parses"}], max_steps=steps,
                         prompts_per_step=prompts, num_generations=generations, max_completion_length=length,
                         micro_batch_size=prompts * generations, lr=1e-5)  # fmt: skip
        items, _ = prepare_prompts(rows, tok, ChatTemplate(), CONTEXT - length)
        out = workdir / "clearlm"
        out.mkdir(exist_ok=True)
        started = time.perf_counter()
        train_rlvr(model, items, [load("python_parses", 1.0, None, workdir)], cfg, 0, pad, Sampler(tok, eos, cfg),
                   out)  # fmt: skip
        seconds = time.perf_counter() - started
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        tokens = sum(r["completions/mean_length"] * prompts * generations for r in log)
        rewards = [r["reward"] for r in log]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak,
            "rewards": rewards}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--length", type=int, default=64, help="max new tokens per completion")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = [str(args.steps), str(args.prompts), str(args.generations), str(args.length)]
    if args.worker:
        print(json.dumps(run(args.worker, *map(int, settings), args.workdir)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="clearlm-rlvr-"))
    results = {}
    for tool in ("trl", "clearlm"):
        out = subprocess.run([sys.executable, __file__, "--worker", tool, "--steps", settings[0], "--prompts",
                              settings[1], "--generations", settings[2], "--length", settings[3], "--workdir",
                              str(workdir)], env=worker_environment(tool), capture_output=True, text=True,
                             check=True)  # fmt: skip
        results[tool] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"GRPO: {args.steps} steps of {args.prompts} prompts x {args.generations} completions, up to {args.length} "
          "new tokens, float32, 2 threads")  # fmt: skip
    for tool, r in (("TRL", results["trl"]), ("clearlm", results["clearlm"])):
        print(f"  {tool:<8} {r['steps_per_s']:6.3f} steps/s  {r['tokens_per_s']:8,.0f} completion tokens/s  "
              f"peak {r['peak_mb']:6.0f} MB  {r['seconds']:.1f} s")  # fmt: skip
    ratio = results["clearlm"]["steps_per_s"] / results["trl"]["steps_per_s"]
    print(f"  ratio (steps/s) {ratio:.2f}x")


if __name__ == "__main__":
    main()
