"""Generative tasks: responses from the generation engine, answers extracted by the task's filters, and metrics
(exact match, IFEval's checkers, pass@k of programs run in the sandbox), each as lm-evaluation-harness computes it."""

from __future__ import annotations

import random
from typing import Any

from tokenizers import Tokenizer

from clearlm.errors import InputError
from clearlm.eval.filters import NO_FILTER, Filter, apply_filter
from clearlm.eval.metrics import exact_match, pass_at_k
from clearlm.eval.scoring import Encoder
from clearlm.eval.taskspec import Doc, TaskSpec
from clearlm.model.auto import CausalLM
from clearlm.model.generate import Sampling, generate
from clearlm.sandbox import Limits, run_many

IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def metric_key(metric: str, flt: Filter, spec: TaskSpec) -> str:
    """lm-eval's `metric,filter` naming; a task without filters keeps plain metric names."""
    return metric if not spec.filters else f"{metric},{flt.name}"


def generate_responses(spec: TaskSpec, contexts: list[str], model: CausalLM, tok: Tokenizer, encoder: Encoder,
                       eos_id: int | None, batch_size: int, seed: int) -> list[list[str]]:  # fmt: skip
    """`repeats` generations per context, decoded as lm-eval decodes them (special tokens skipped)."""
    if spec.max_gen_tokens >= model.cfg.context:
        raise InputError(f"task {spec.name!r}: max_gen_tokens {spec.max_gen_tokens} leaves no room for a prompt in "
                         f"the model's context of {model.cfg.context} (cap it with --max-gen-tokens)")  # fmt: skip
    prompts = [encoder.encode(context) for context in contexts for _ in range(spec.repeats)]
    completions = generate(
        model, prompts, max_new_tokens=spec.max_gen_tokens, eos_ids=[] if eos_id is None else [eos_id],
        stop=spec.until, decode=lambda ids: tok.decode(ids, skip_special_tokens=True), batch_size=batch_size,
        sampling=Sampling(spec.temperature, spec.top_k, spec.top_p, seed),
    )  # fmt: skip
    texts = [c.text for c in completions]
    return [texts[i : i + spec.repeats] for i in range(0, len(texts), spec.repeats)]


def generation_rows(
    spec: TaskSpec, docs: list[Doc], generations: list[list[str]], workers: int | None
) -> list[dict[str, Any]]:
    """Each document's generations, filtered answers and metrics. pass@k scores every sample: the filter's list of
    answers, or all the responses under the default filter; each program (HF code_eval's layout: the candidate, a
    newline, the tests) runs in the sandbox, all of them at once over `workers` processes (default: the cores)."""
    rows, programs = [], []
    single = [m for m in spec.metrics if m != "pass@k"]
    letters = random.Random(0)  # ifeval's draws, in item order, as lm-eval's run seeded 0 draws them
    for doc, responses in zip(docs, generations, strict=True):
        target = str(spec.target(doc))
        row: dict[str, Any] = {"generations": responses, "target": target, "filtered": {}, "metrics": {}}
        for flt in spec.filters or [NO_FILTER]:
            answer = apply_filter(flt, responses, doc)
            row["filtered"][flt.name] = answer
            if "pass@k" in spec.metrics:
                candidates = responses if flt is NO_FILTER else [answer] if isinstance(answer, str) else answer
                programs.append((row, flt, [c + "\n" + target for c in candidates]))
            if "exact_match" in single:
                row["metrics"][metric_key("exact_match", flt, spec)] = exact_match(answer, target, spec.exact_match)
            if any(m in IFEVAL_METRICS for m in single):
                from clearlm.eval.ifeval import score_response  # nltk and langdetect: only when a task needs them

                scores = score_response(doc, answer, letters)
                row["metrics"].update({metric_key(m, flt, spec): scores[m] for m in single if m in IFEVAL_METRICS})
        rows.append(row)
    if programs:
        limits = Limits(wall_seconds=spec.timeout)
        verdicts = iter(run_many([p for _, _, group in programs for p in group], limits, workers=workers))
        for row, flt, group in programs:
            mine = [next(verdicts) for _ in group]
            row.setdefault("verdicts", {})[flt.name] = [v.reason for v in mine]
            correct = sum(v.passed for v in mine)
            for k in spec.pass_k:
                row["metrics"][metric_key(f"pass@{k}", flt, spec)] = pass_at_k(len(mine), correct, k)
    return rows
