"""Run tasks on a model: build every request, score them in one batched pass, compute metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from clearlm.errors import InputError
from clearlm.eval import bbq
from clearlm.eval.generative import generate_responses, generation_rows
from clearlm.eval.metrics import acc_norm_pred, argmax, mean_and_stderr, perplexity, true_mass
from clearlm.eval.scoring import Encoder, score_requests
from clearlm.eval.taskspec import Doc, TaskSpec, load_docs
from clearlm.model.auto import CausalLM


@dataclass
class TaskRun:
    spec: TaskSpec
    docs: list[Doc]
    shots: int
    requests: list[tuple[str, str]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # requests of each doc
    contexts: list[str] = field(default_factory=list)


def _gold_text(spec: TaskSpec, doc: Doc) -> str:
    if spec.output_type == "multiple_choice" and not spec.partial:
        return spec.choices(doc)[spec.target(doc)]
    return str(spec.target(doc))


def _fewshot_prefix(spec: TaskSpec, pool: list[Doc], doc: Doc, k: int, rng: random.Random) -> str:
    """k labelled examples drawn as lm-eval's samplers draw them. From the evaluated rows themselves (no
    `fewshot_filter`) the evaluated item is excluded: `first_n` takes the first k others; the default draws k + 1,
    removes the item and redraws from the others if too few remain. From rows of their own, `first_n` takes the
    first k and the default draws k."""
    if k == 0:
        return ""
    separate = spec.fewshot_filter is not None
    if k > len(pool) - (not separate):
        raise InputError(f"task {spec.name!r} has {len(pool)} example rows: too few for {k}-shot prompts")
    if spec.fewshot_sampler == "first_n":
        shots = (pool if separate else [x for x in pool if x != doc])[:k]
    elif separate:
        shots = rng.sample(pool, k)
    else:
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
    spec: TaskSpec, docs: list[Doc], num_fewshot: int, seed: int, pool: list[Doc] | None = None
) -> TaskRun:
    """Requests for `docs`; few-shot examples come from `pool` (the whole split, or the task's example rows),
    seeded as lm-eval does."""
    run = TaskRun(spec, docs, num_fewshot)
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
    if "mc2" in spec.metrics:
        out["mc2"] = true_mass(lls, spec.labels(doc))
    if "likelihood_diff" in spec.metrics or "pct_stereotype" in spec.metrics:  # CrowS-Pairs: choice 0 is stereotyped
        out["likelihood_diff"], out["pct_stereotype"] = abs(lls[0] - lls[1]), float(lls[0] > lls[1])
    if spec.preprocess == "bbq":
        out["bbq"] = bbq.item(doc, pred)
        out["acc"] = out["bbq"]["acc"]
    return out


def _aggregate(spec: TaskSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean and standard error over items; lm-eval's own aggregates where a metric is not a mean
    (perplexity, ifeval's instruction level, BBQ's context-split accuracies and bias scores)."""
    metrics: dict[str, Any] = {"samples": len(rows)}
    if spec.output_type == "generate":
        columns = {name: [r["metrics"][name] for r in rows] for name in rows[0]["metrics"]}
    else:
        columns = {name: [r[name] for r in rows] for name in spec.metrics if name in rows[0]}
    for name, values in columns.items():
        if isinstance(values[0], list):  # ifeval's instruction level: over all instructions of all prompts
            metrics[name], metrics[f"{name}_stderr"] = sum(map(sum, values)) / sum(map(len, values)), None
        else:
            metrics[name], metrics[f"{name}_stderr"] = mean_and_stderr(values)
    if "perplexity" in spec.metrics:
        metrics["perplexity"], metrics["perplexity_stderr"] = perplexity([r["loglikelihood"] for r in rows]), None
    if spec.preprocess == "bbq":
        metrics.update(bbq.aggregate([r["bbq"] for r in rows]))
    return metrics


def evaluate_tasks(
    model: CausalLM,
    tok: Tokenizer,
    specs: list[TaskSpec],
    data_dir: Path | list[Path] | None,
    *,
    prefix_id: int,
    eos_id: int | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
    workers: int | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per-task metrics and per-item samples. All log-likelihood requests of all tasks are scored in one sorted,
    batched pass; each generative task's prompts go through the generation engine together. `num_fewshot` None
    means each task's own default; `workers` is how many sandboxed programs run at once (default: the cores)."""
    runs = []
    for spec in specs:
        shots = spec.num_fewshot if num_fewshot is None else num_fewshot
        pool = None
        if shots and spec.fewshot_filter:
            pool, docs = load_docs(spec, data_dir, fewshot=True), load_docs(spec, data_dir, limit)
        elif shots:  # the examples come from all the evaluated rows: read them once
            pool = load_docs(spec, data_dir)
            docs = pool[:limit]
        else:
            docs = load_docs(spec, data_dir, limit)
        runs.append(build_requests(spec, docs, shots, seed, pool))
    encoder = Encoder(tok, prefix_id)
    all_requests = [r for run in runs for r in run.requests]
    scores = score_requests(model, encoder, all_requests, batch_size) if all_requests else []
    results, samples, offset = {}, [], 0
    for run in runs:
        if run.spec.output_type == "generate":
            generations = generate_responses(run.spec, run.contexts, model, tok, encoder,
                                             eos_id if eos_id is not None else prefix_id, batch_size, seed)  # fmt: skip
            rows = generation_rows(run.spec, run.docs, generations, workers)
        else:
            mine = scores[offset : offset + len(run.requests)]
            offset += len(run.requests)
            rows = [_doc_result(run.spec, doc, mine[a:b]) for doc, (a, b) in zip(run.docs, run.spans, strict=True)]
        results[run.spec.name] = {**_aggregate(run.spec, rows), "num_fewshot": run.shots}
        for doc_id, (row, context) in enumerate(zip(rows, run.contexts, strict=True)):
            samples.append({"task": run.spec.name, "doc_id": doc_id, "context": context, **row})
    return results, samples
