"""Run tasks on a model: build every request, score them in one batched pass, compute metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from clearlm.errors import InputError
from clearlm.eval.generate import generate
from clearlm.eval.metrics import acc_norm_pred, argmax, mean_and_stderr, perplexity
from clearlm.eval.scoring import Encoder, score_requests
from clearlm.eval.taskspec import Doc, TaskSpec, load_docs
from clearlm.model.auto import CausalLM


@dataclass
class TaskRun:
    spec: TaskSpec
    docs: list[Doc]
    data_path: Path
    requests: list[tuple[str, str]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # requests of each doc
    contexts: list[str] = field(default_factory=list)


def _gold_text(spec: TaskSpec, doc: Doc) -> str:
    if spec.output_type == "multiple_choice" and not spec.partial:
        return spec.choices(doc)[spec.target(doc)]
    return str(spec.target(doc))


def _fewshot_prefix(spec: TaskSpec, pool: list[Doc], doc: Doc, k: int, rng: random.Random) -> str:
    """k labelled examples drawn as lm-eval's default sampler draws them from a task's only split:
    k + 1 documents, the evaluated one removed, redrawn from the others if too few remain."""
    if k == 0:
        return ""
    if k >= len(pool):
        raise InputError(f"task {spec.name!r} has {len(pool)} items: too few for {k}-shot prompts")
    shots = [x for x in rng.sample(pool, k + 1) if x != doc][:k]
    if len(shots) < k:
        shots = rng.sample([x for x in pool if x != doc], k)
    parts = []
    for shot in shots:
        if spec.partial:
            parts.append(spec.choices(shot)[spec.text(shot)] + spec.target_delimiter + str(spec.target(shot)))
        else:
            parts.append(str(spec.text(shot)) + spec.target_delimiter + _gold_text(spec, shot))
    return "".join(part + spec.fewshot_delimiter for part in parts)


def build_requests(
    spec: TaskSpec, docs: list[Doc], data_path: Path, num_fewshot: int, seed: int, pool: list[Doc] | None = None
) -> TaskRun:
    """Requests for `docs`; few-shot examples come from `pool` (the whole split), seeded as lm-eval does."""
    run = TaskRun(spec, docs, data_path)
    rng = random.Random(seed)
    pool = pool if pool is not None else docs
    for doc in docs:
        prefix = _fewshot_prefix(spec, pool, doc, num_fewshot, rng)
        start = len(run.requests)
        if spec.partial:
            cont = spec.target_delimiter + str(spec.target(doc))
            run.requests += [(prefix + option, cont) for option in spec.choices(doc)]
            run.contexts.append(prefix)
        else:
            context = prefix + str(spec.text(doc))
            run.contexts.append(context)
            if spec.output_type == "multiple_choice":
                run.requests += [(context, spec.target_delimiter + c) for c in spec.choices(doc)]
            elif spec.output_type == "loglikelihood":
                run.requests.append((context, str(spec.target(doc))))
        run.spans.append((start, len(run.requests)))
    return run


def _doc_result(spec: TaskSpec, doc: Doc, scores: list[Any]) -> dict[str, Any]:
    if spec.output_type == "loglikelihood":
        return {"loglikelihood": scores[0].logprob, "acc": float(scores[0].is_greedy)}
    lls = [s.logprob for s in scores]
    gold = spec.text(doc) if spec.partial else spec.target(doc)
    pred = argmax(lls)
    out = {"loglikelihoods": lls, "is_greedy": [s.is_greedy for s in scores], "pred": pred, "gold": gold}
    out["acc"] = float(pred == gold)
    if "acc_norm" in spec.metrics and not spec.partial:
        out["acc_norm"] = float(acc_norm_pred(lls, spec.choices(doc)) == gold)
    return out


def _aggregate(spec: TaskSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"samples": len(rows)}
    for name in spec.metrics:
        if name == "perplexity":
            metrics["perplexity"] = perplexity([r["loglikelihood"] for r in rows])
            metrics["perplexity_stderr"] = None
        else:
            metrics[name], metrics[f"{name}_stderr"] = mean_and_stderr([r[name] for r in rows])
    return metrics


def _generate_rows(run: TaskRun, model: CausalLM, tok: Tokenizer, stop_id: int | None) -> list[dict[str, Any]]:
    rows = []
    for doc, context in zip(run.docs, run.contexts, strict=True):
        text = generate(
            model, tok, context, max_new_tokens=run.spec.max_gen_tokens, temperature=0, stop_id=stop_id,
            stop_strings=run.spec.until, add_special_tokens=True,
        )  # fmt: skip
        gold = str(run.spec.target(doc))
        rows.append({"generation": text, "gold": gold, "exact_match": float(text == gold)})  # lm-eval: no strip
    return rows


def evaluate_tasks(
    model: CausalLM,
    tok: Tokenizer,
    specs: list[TaskSpec],
    data_dir: Path | list[Path] | None,
    *,
    prefix_id: int,
    eos_id: int | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per-task metrics and per-item samples. All log-likelihood requests of all tasks are scored in
    one sorted, batched pass."""
    runs = []
    for spec in specs:
        pool = load_docs(spec, data_dir) if num_fewshot else None
        docs = pool[:limit] if pool is not None else load_docs(spec, data_dir, limit)
        runs.append(build_requests(spec, docs, spec.data_path(data_dir), num_fewshot, seed, pool))
    all_requests = [r for run in runs for r in run.requests]
    scores = score_requests(model, Encoder(tok, prefix_id), all_requests, batch_size) if all_requests else []
    results, samples, offset = {}, [], 0
    for run in runs:
        if run.spec.output_type == "generate":
            rows = _generate_rows(run, model, tok, eos_id if eos_id is not None else prefix_id)
        else:
            mine = scores[offset : offset + len(run.requests)]
            offset += len(run.requests)
            rows = [_doc_result(run.spec, doc, mine[a:b]) for doc, (a, b) in zip(run.docs, run.spans, strict=True)]
        results[run.spec.name] = _aggregate(run.spec, rows)
        for doc_id, (row, context) in enumerate(zip(rows, run.contexts, strict=True)):
            samples.append({"task": run.spec.name, "doc_id": doc_id, "context": context, **row})
    return results, samples
