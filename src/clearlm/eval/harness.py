"""Run tasks on a model: build every request, score them in one batched pass, compute metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from clearlm.errors import InputError
from clearlm.eval import bbq
from clearlm.eval.filters import NO_FILTER, Filter, apply_filter
from clearlm.eval.metrics import acc_norm_pred, argmax, exact_match, mean_and_stderr, pass_at_k, perplexity, true_mass
from clearlm.eval.scoring import Encoder, score_requests
from clearlm.eval.taskspec import Doc, TaskSpec, load_docs
from clearlm.model.auto import CausalLM
from clearlm.model.generate import Sampling, generate
from clearlm.sandbox import Limits, run_many

IFEVAL_METRICS = {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"}


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
    """k labelled examples drawn as lm-eval's samplers draw them: `first_n` takes the pool's first k; the default
    draws k + 1 documents, the evaluated one removed, redrawn from the others if too few remain."""
    if k == 0:
        return ""
    if k >= len(pool) + (spec.fewshot_filter is not None):
        raise InputError(f"task {spec.name!r} has {len(pool)} items: too few for {k}-shot prompts")
    if spec.fewshot_sampler == "first_n":
        shots = pool[:k]
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


def _metric_key(metric: str, flt: Filter, spec: TaskSpec) -> str:
    """lm-eval's `metric,filter` naming; a task without filters keeps plain metric names."""
    return metric if not spec.filters else f"{metric},{flt.name}"


def _generate(run: TaskRun, model: CausalLM, tok: Tokenizer, encoder: Encoder, eos_id: int | None, batch_size: int,
              seed: int) -> list[list[str]]:  # fmt: skip
    """`repeats` generations per document, decoded as lm-eval decodes them (special tokens skipped)."""
    spec = run.spec
    if spec.max_gen_tokens >= model.cfg.context:
        raise InputError(f"task {spec.name!r}: max_gen_tokens {spec.max_gen_tokens} leaves no room for a prompt in "
                         f"the model's context of {model.cfg.context} (cap it with --max-gen-tokens)")  # fmt: skip
    prompts = [encoder.encode(context) for context in run.contexts for _ in range(spec.repeats)]
    completions = generate(
        model, prompts, max_new_tokens=spec.max_gen_tokens, eos_ids=[] if eos_id is None else [eos_id],
        stop=spec.until, decode=lambda ids: tok.decode(ids, skip_special_tokens=True), batch_size=batch_size,
        sampling=Sampling(spec.temperature, spec.top_k, spec.top_p, seed),
    )  # fmt: skip
    texts = [c.text for c in completions]
    return [texts[i : i + spec.repeats] for i in range(0, len(texts), spec.repeats)]


def _generation_rows(run: TaskRun, generations: list[list[str]], workers: int | None) -> list[dict[str, Any]]:
    """Each document's generations, filtered answers and metrics; code tasks' programs run in the sandbox."""
    spec, rows, programs = run.spec, [], []
    single = [m for m in spec.metrics if m != "pass@k"]
    letters = random.Random(0)  # ifeval's draws, in item order, as lm-eval's run seeded 0 draws them
    for doc, responses in zip(run.docs, generations, strict=True):
        target = str(spec.target(doc))
        row: dict[str, Any] = {"generations": responses, "target": target, "filtered": {}, "metrics": {}}
        for flt in spec.filters or [NO_FILTER]:
            answer = apply_filter(flt, responses, doc)
            row["filtered"][flt.name] = answer
            if "pass@k" in spec.metrics:  # HF code_eval's program: the candidate, a newline, the tests
                programs += [(row, flt, [c + "\n" + target for c in ([answer] if isinstance(answer, str) else answer)])]
            if single and not isinstance(answer, str):
                raise InputError(f"task {spec.name!r}: filter {flt.name!r} leaves {len(answer)} answers per item; "
                                 f"{single[0]} needs one (end the filter with take_first)")  # fmt: skip
            if "exact_match" in single:
                row["metrics"][_metric_key("exact_match", flt, spec)] = exact_match(answer, target, spec.exact_match)
            if set(single) & IFEVAL_METRICS:
                from clearlm.eval.ifeval import score_response

                scores = score_response(doc, answer, letters)
                row["metrics"].update({_metric_key(m, flt, spec): scores[m] for m in single if m in IFEVAL_METRICS})
        rows.append(row)
    if programs:
        limits = Limits(wall_seconds=spec.timeout)
        verdicts = iter(run_many([p for _, _, group in programs for p in group], limits, workers=workers))
        for row, flt, group in programs:
            mine = [next(verdicts) for _ in group]
            row.setdefault("verdicts", {})[flt.name] = [v.reason for v in mine]
            correct = sum(v.passed for v in mine)
            for k in spec.pass_k:
                row["metrics"][_metric_key(f"pass@{k}", flt, spec)] = pass_at_k(len(mine), correct, k)
    return rows


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
        docs = load_docs(spec, data_dir, limit)
        pool = None
        if shots:
            pool = load_docs(spec, data_dir, fewshot=True) if spec.fewshot_filter else load_docs(spec, data_dir)
        runs.append(build_requests(spec, docs, spec.data_path(data_dir), shots, seed, pool))
    encoder = Encoder(tok, prefix_id)
    all_requests = [r for run in runs for r in run.requests]
    scores = score_requests(model, encoder, all_requests, batch_size) if all_requests else []
    results, samples, offset = {}, [], 0
    for run in runs:
        if run.spec.output_type == "generate":
            generations = _generate(run, model, tok, encoder, eos_id if eos_id is not None else prefix_id,
                                    batch_size, seed)  # fmt: skip
            rows = _generation_rows(run, generations, workers)
        else:
            mine = scores[offset : offset + len(run.requests)]
            offset += len(run.requests)
            rows = [_doc_result(run.spec, doc, mine[a:b]) for doc, (a, b) in zip(run.docs, run.spans, strict=True)]
        results[run.spec.name] = _aggregate(run.spec, rows)
        for doc_id, (row, context) in enumerate(zip(rows, run.contexts, strict=True)):
            samples.append({"task": run.spec.name, "doc_id": doc_id, "context": context, **row})
    return results, samples
