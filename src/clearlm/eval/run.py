"""Evaluate a model folder: tasks, bits-per-byte on text files, preference pairs — one results file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from clearlm.data.documents import read_jsonl
from clearlm.data.sources import read_source
from clearlm.errors import InputError
from clearlm.eval.harness import evaluate_tasks
from clearlm.eval.perplexity import domain_bits_per_byte
from clearlm.eval.preference import preference_accuracy, read_preferences
from clearlm.eval.results import describe_inputs, write_samples
from clearlm.eval.scoring import Encoder
from clearlm.eval.taskspec import TaskSpec, capped, resolve_tasks
from clearlm.model.auto import CausalLM
from clearlm.model.transformer import Transformer
from clearlm.model.weights import load_model
from clearlm.numerics import begin_stage, stage_threads
from clearlm.recipe import SourceConfig
from clearlm.release.load import bos_token_id, load_release
from clearlm.sandbox import enforcement
from clearlm.stages import StageRun, final_model, spec


@dataclass
class EvalRequest:
    model: Path
    tasks: list[str] = field(default_factory=list)
    task_files: list[Path] = field(default_factory=list)
    data_dir: Path | None = None
    bpb_files: list[Path] = field(default_factory=list)
    preference_files: list[Path] = field(default_factory=list)
    reference: Path | None = None
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None
    batch_size: int = 16
    threads: int = 0  # 0: this process's cores; a sum split over another count of threads rounds differently
    max_gen_tokens: int | None = None  # a cap on generative tasks' budgets (lm-eval's gen_kwargs max_gen_toks)


def _corpus_text(tok: Tokenizer) -> Tokenizer:
    """The tokenizer reading documents as training read them: special-token strings in the text stay text."""
    clone = Tokenizer.from_str(tok.to_str())
    clone.encode_special_tokens = True
    return clone


def score(
    model: CausalLM, tok: Tokenizer, prefix_id: int, eos_id: int | None, *, specs: list[TaskSpec],
    data_dirs: list[Path], corpora: dict[str, Iterable[dict[str, Any]]], num_fewshot: int | None, limit: int | None,
    batch_size: int, max_documents: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """(task results, bits per byte per domain of each corpus, per-item samples): what `clearlm eval MODEL` and
    the recipe's eval stage both compute, the same way. `prefix_id` is the token log-likelihoods start after
    (lm-eval's: the model's BOS, else its end-of-text)."""
    tasks, samples = {}, []
    if specs:
        tasks, samples = evaluate_tasks(model, tok, specs, data_dirs, prefix_id=prefix_id, eos_id=eos_id,
                                        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)  # fmt: skip
    text_tok = _corpus_text(tok)
    bpb = {key: domain_bits_per_byte(model, text_tok, docs, prefix_id, batch_size, max_documents)
           for key, docs in corpora.items()}  # fmt: skip
    return tasks, bpb, samples


def evaluate_model(req: EvalRequest) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(results, samples, metadata) for everything the request names."""
    specs = capped(resolve_tasks(req.tasks, req.task_files), req.max_gen_tokens)
    if not (specs or req.bpb_files or req.preference_files):
        raise InputError("nothing to evaluate: pass --tasks (see --list), --task-file, --bpb or --preferences")
    numerics = begin_stage(stage_threads(req.threads))  # the same scores whatever the process did before
    model, tok, eos_id = load_release(req.model)
    prefix_id = bos_token_id(req.model, eos_id)
    started = time.perf_counter()
    corpora = {f"bpb:{path.name}": read_source(SourceConfig(path=str(path)), Path.cwd()) for path in req.bpb_files}
    results, bpb, samples = score(model, tok, prefix_id, eos_id, specs=specs, data_dirs=[req.data_dir] if req.data_dir
                                  else [], corpora=corpora, num_fewshot=req.num_fewshot, limit=req.limit,
                                  batch_size=req.batch_size)  # fmt: skip
    results.update(bpb)
    reference = load_release(req.reference)[0] if req.reference else None
    for path in req.preference_files:
        triples = read_preferences(path)
        if req.limit:
            triples = triples[: req.limit]
        metrics, rows = preference_accuracy(
            model, Encoder(tok, prefix_id), triples, reference=reference, batch_size=req.batch_size
        )
        results[f"preferences:{path.name}"] = metrics
        samples += [{"task": f"preferences:{path.name}", "doc_id": i, **row} for i, row in enumerate(rows)]
    meta = {
        "config": {
            "tasks": [s.name for s in specs], "num_fewshot": req.num_fewshot, "limit": req.limit,
            "fewshot_source": "a task's fewshot_filter rows, else the evaluated file, the item excluded (seed 1234)",
            "batch_size": req.batch_size, "max_gen_tokens": req.max_gen_tokens,
            "bpb_files": [str(p) for p in req.bpb_files],
            "preference_files": [str(p) for p in req.preference_files],
            "reference": str(req.reference) if req.reference else None,
            "seconds": round(time.perf_counter() - started, 3),
        },
        "numerics": numerics,
        **({"sandbox": enforcement()} if any("pass@k" in s.metrics for s in specs) else {}),
        **describe_inputs(req.model, specs, req.data_dir),
    }  # fmt: skip
    return results, samples, meta


def build_stage(run: StageRun, out: Path) -> dict[str, Any]:
    """The recipe's evaluation of its final model, scored by `score` as `clearlm eval MODEL` scores a folder:
    bits per byte per validation domain of every corpus (and the untrained model's, for scale) and the `[eval]`
    tasks. The prefix token is the end-of-text token, which a clearlm release also names as its BOS."""
    cfg, recipe = run.recipe.eval, run.recipe
    final = run.inputs[final_model(recipe)]
    tok = Tokenizer.from_file(str(run.inputs.get("tokenizer", final).path / "tokenizer.json"))
    eos_id = tok.token_to_id(recipe.tokenizer.eos_token)
    trained = load_model(final.path)
    corpora = [name for name in run.inputs if spec(name).datasets]  # the recipe's corpus: "bits_per_byte"

    def validation() -> dict[str, Any]:  # others (mid-training's): "<stage>_bits_per_byte"
        return {("" if name == "data" else f"{name}_") + "bits_per_byte":
                read_jsonl(run.inputs[name].path / "validation.jsonl") for name in corpora if cfg.bpb}  # fmt: skip

    data_dirs = [run.base_dir / cfg.data_dir] if cfg.data_dir else []
    data_dirs += [run.inputs[name].path for name in corpora]
    specs = resolve_tasks(cfg.tasks, [run.base_dir / f for f in cfg.task_files])
    tasks, metrics, samples = score(trained, tok, eos_id, eos_id, specs=specs, data_dirs=data_dirs,
                                    corpora=validation(), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                    batch_size=cfg.batch_size, max_documents=cfg.max_documents_per_domain)  # fmt: skip
    if "bits_per_byte" in metrics:  # the recipe's corpus, scored by the untrained model for scale
        untrained = Transformer(trained.cfg)
        untrained.init_weights(recipe.seed)
        corpus = {"bits_per_byte": validation()["bits_per_byte"]}
        _, scale, _ = score(untrained, tok, eos_id, eos_id, specs=[], data_dirs=[], corpora=corpus,
                            num_fewshot=0, limit=None, batch_size=cfg.batch_size,
                            max_documents=cfg.max_documents_per_domain)  # fmt: skip
        metrics.update({key.replace("bits_per_byte", "untrained_bits_per_byte"): v for key, v in scale.items()})
    if specs:
        metrics["tasks"] = tasks
        write_samples(out / "samples.jsonl", samples)
    (out / "results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
