"""The data stage: gather documents from every source, split them and record per-source statistics."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import chain, islice
from pathlib import Path
from typing import Any

from clearlm.data import builtin
from clearlm.data.card import data_card
from clearlm.data.documents import Document, in_validation
from clearlm.data.sources import files_digest, read_source, source_files, source_root
from clearlm.data.steps import Removed, Step, build_steps
from clearlm.errors import InputError
from clearlm.recipe import DataConfig

SPLITS = ("train", "validation")


def data_identity(cfg: DataConfig, base_dir: Path) -> dict[str, Any]:
    """Digests of the raw inputs, so edited source files re-run the data stage and all after it."""
    identity: dict[str, Any] = {}
    if cfg.builtin:
        identity["builtin"] = builtin.corpus_identity()
    identity["sources"] = [
        {"path": src.path, "digest": files_digest(source_files(src, base_dir), source_root(src, base_dir))}
        for src in cfg.sources
    ]
    return identity


def _weighted(docs: Iterator[Document], weight: float) -> Iterator[tuple[Document, float]]:
    return ((doc, weight) for doc in docs)


def iter_documents(cfg: DataConfig, base_dir: Path) -> Iterator[tuple[Document, float]]:
    """Every source's documents with the source's mixing weight, in recipe order."""
    streams = [_weighted(builtin.stdlib_documents(), cfg.builtin_weight)] if cfg.builtin else []
    streams += [_weighted(read_source(src, base_dir), src.weight) for src in cfg.sources]
    docs = chain.from_iterable(streams)
    return islice(docs, cfg.max_documents) if cfg.max_documents else docs


def _repeat(doc: Document, k: int) -> Document:
    return {**doc, "id": f"{doc['id']}#{k}", "metadata": {**doc["metadata"], "repeat": k}}


def copies(doc_id: str, weight: float) -> int:
    """How many times a document enters the mix: floor(weight), plus one with the fractional part's
    probability, decided by a hash of its id (deterministic, independent of order and workers)."""
    whole = int(weight)
    draw = int.from_bytes(hashlib.sha256(f"mix:{doc_id}".encode()).digest()[:8], "big") / 2**64
    return whole + (1 if draw < weight - whole else 0)


def _location(doc: Document) -> str:
    meta = doc["metadata"]
    if "line" in meta:
        return f"{meta['file']}:{meta['line']}"
    return str(meta.get("file") or meta.get("path") or doc["source"])


def _apply_steps(
    doc: Document, steps: list[tuple[str, Step]], step_stats: dict[str, dict[str, Any]]
) -> tuple[Document | None, str | None, str | None]:
    """Run the steps in order: (kept document, None, None) or (None, step, reason)."""
    for name, step in steps:
        entry = step_stats[name]
        entry["documents_in"] += 1
        entry["bytes_in"] += len(doc["text"].encode("utf-8"))
        result = step(doc)
        if isinstance(result, Removed):
            entry["removed"] += 1
            entry["reasons"][result.reason] += 1
            entry["removed_by_source"][doc["source"]] += 1
            return None, name, result.reason
        doc = result
        entry["bytes_out"] += len(doc["text"].encode("utf-8"))
    return doc, None, None


def build_corpus(cfg: DataConfig, base_dir: Path, out: Path) -> dict[str, Any]:
    """Clean, split and write `train.jsonl`, `validation.jsonl` and `removed.jsonl` in one pass.

    Returns per-split, per-source counts, per-step statistics and the licence of each source.
    """
    stats: dict[str, dict[str, dict[str, int]]] = {s: defaultdict(lambda: {"documents": 0, "bytes": 0}) for s in SPLITS}
    before: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0})
    steps = build_steps(cfg.steps, base_dir)
    mixing: dict[str, dict[str, float]] = defaultdict(lambda: {"weight": 1.0, "documents_in": 0, "documents_out": 0})
    step_stats: dict[str, dict[str, Any]] = {
        name: {"documents_in": 0, "removed": 0, "bytes_in": 0, "bytes_out": 0, "reasons": Counter(),
               "removed_by_source": Counter()}
        for name, _ in steps
    }  # fmt: skip
    licenses: dict[str, str] = {}
    seen: dict[str, str] = {}
    with ExitStack() as stack:
        files = {s: stack.enter_context(open(out / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        removed_file = stack.enter_context(open(out / "removed.jsonl", "w", encoding="utf-8"))
        for doc, weight in iter_documents(cfg, base_dir):
            where = _location(doc)
            if doc["id"] in seen:
                raise InputError(f"{where}: duplicate document id {doc['id']!r} (first seen at {seen[doc['id']]})")
            seen[doc["id"]] = where
            licenses.setdefault(doc["source"], doc["license"])
            before[doc["source"]]["documents"] += 1
            before[doc["source"]]["bytes"] += len(doc["text"].encode("utf-8"))
            kept, step_name, reason = _apply_steps(doc, steps, step_stats)
            if kept is None:
                record = {"id": doc["id"], "source": doc["source"], "where": where, "step": step_name, "reason": reason}
                if cfg.keep_removed_text:
                    record["text"] = doc["text"]
                removed_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            is_val = in_validation(kept["metadata"]["split_key"], cfg.validation_fraction)
            split = "validation" if is_val else "train"
            n = copies(kept["id"], weight)
            mix = mixing[kept["source"]]
            mix["weight"], mix["documents_in"], mix["documents_out"] = (
                weight,
                mix["documents_in"] + 1,
                mix["documents_out"] + n,
            )
            for k in range(n):
                copy = (
                    kept
                    if k == 0
                    else {**kept, "id": f"{kept['id']}#{k + 1}", "metadata": {**kept["metadata"], "repeat": k + 1}}
                )
                files[split].write(json.dumps(copy, ensure_ascii=False) + "\n")
                entry = stats[split][kept["source"]]
                entry["documents"] += 1
                entry["bytes"] += len(kept["text"].encode("utf-8"))
    for name, step in steps:
        if hasattr(step, "counts"):
            step_stats[name]["counts"] = dict(step.counts)
    for split in SPLITS:
        if not stats[split]:
            raise InputError(
                f"the {split} split is empty: add documents or change data.validation_fraction "
                f"({cfg.validation_fraction})"
            )
    metrics = {
        "splits": {s: dict(sorted(stats[s].items())) for s in SPLITS},
        "before_steps": dict(sorted(before.items())),
        "steps": {
            name: {**v, "reasons": dict(v["reasons"]), "removed_by_source": dict(v["removed_by_source"])}
            for name, v in step_stats.items()
        },
        "licenses": dict(sorted(licenses.items())),
        "mixing": dict(sorted(mixing.items())),
        "documents": {s: sum(v["documents"] for v in stats[s].values()) for s in SPLITS},
        "bytes": {s: sum(v["bytes"] for v in stats[s].values()) for s in SPLITS},
    }
    (out / "data_card.md").write_text(data_card(metrics, cfg.model_dump(mode="json")))
    return metrics
