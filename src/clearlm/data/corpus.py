"""The data stage: gather documents from every source, split them and record per-source statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from itertools import chain, islice
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from clearlm.data import builtin
from clearlm.data.card import data_card
from clearlm.data.documents import Document, in_validation
from clearlm.data.plots import length_histogram
from clearlm.data.sources import BadRecord, files_digest, read_source, source_files, source_root
from clearlm.data.steps import Removed, Step, build_steps
from clearlm.errors import InputError
from clearlm.recipe import DataConfig, StepConfig

SPLITS = ("train", "validation")
logger = logging.getLogger(__name__)


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


def iter_documents(
    cfg: DataConfig,
    base_dir: Path,
    on_reject: Callable[[BadRecord], None] | None = None,
    on_file_error: Callable[[InputError], None] | None = None,
) -> Iterator[tuple[Document, float]]:
    """Every source's documents with the source's mixing weight, in recipe order."""
    handlers = {k: v for k, v in (("on_reject", on_reject), ("on_file_error", on_file_error)) if v is not None}
    streams = [_weighted(builtin.stdlib_documents(), cfg.builtin_weight)] if cfg.builtin else []
    streams += [_weighted(read_source(src, base_dir, **handlers), src.weight) for src in cfg.sources]
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


def _new_stats() -> dict[str, Any]:
    return {"documents_in": 0, "removed": 0, "bytes_in": 0, "bytes_out": 0, "reasons": Counter(),
            "removed_by_source": Counter()}  # fmt: skip


Trace = list[tuple[str, int, int | None, str | None]]  # (step, bytes in, bytes out or None, removal reason)


def _apply_steps(doc: Document, steps: list[tuple[str, Step]]) -> tuple[Document | None, Trace]:
    """Run the steps in order; the trace says what each did, for the statistics."""
    trace: Trace = []
    size = len(doc["text"].encode("utf-8"))
    for name, step in steps:
        result = step(doc)
        if isinstance(result, Removed):
            trace.append((name, size, None, result.reason))
            return None, trace
        size_out = size if result is doc else len(result["text"].encode("utf-8"))
        trace.append((name, size, size_out, None))
        doc, size = result, size_out
    return doc, trace


def _record(step_stats: dict[str, dict[str, Any]], source: str, trace: Trace) -> tuple[str | None, str | None]:
    for name, size_in, size_out, reason in trace:
        entry = step_stats[name]
        entry["documents_in"] += 1
        entry["bytes_in"] += size_in
        if reason is not None:
            entry["removed"] += 1
            entry["reasons"][reason] += 1
            entry["removed_by_source"][source] += 1
            return name, reason
        entry["bytes_out"] += size_out
    return None, None


# Steps that look at one document at a time (no state shared between documents) run in worker
# processes; dedup and decontamination run in the main process, in corpus order.
PARALLEL_STEPS = {"normalize", "language", "gopher_quality", "gopher_repetition", "c4_quality", "pii"}
_worker_steps: list[tuple[str, Step]] = []


def _init_worker(configs: list[dict[str, Any]], base_dir: Path) -> None:
    global _worker_steps
    _worker_steps = build_steps(TypeAdapter(list[StepConfig]).validate_python(configs), base_dir)


def _worker_chunk(docs: list[Document]) -> tuple[list[tuple[Document | None, Trace]], dict[str, dict[str, int]]]:
    """Run the parallel steps on a chunk; also return what stateful counters (PII masks) gained."""
    before = {name: dict(getattr(step, "counts", {})) for name, step in _worker_steps}
    results = [_apply_steps(doc, _worker_steps) for doc in docs]
    gained = {
        name: {k: v - before[name].get(k, 0) for k, v in dict(getattr(step, "counts", {})).items()}
        for name, step in _worker_steps
    }
    return results, gained


def _chunks(docs: Iterator[tuple[Document, float]], size: int) -> Iterator[list[tuple[Document, float]]]:
    while chunk := list(islice(docs, size)):
        yield chunk


def _cleaned(
    cfg: DataConfig,
    base_dir: Path,
    docs: Iterator[tuple[Document, float]],
    steps: list[tuple[str, Step]],
    counts: dict[str, Counter[str]],
) -> Iterator[tuple[Document, float, Document | None, Trace]]:
    """(original, weight, cleaned document or None, trace) in corpus order, with `workers` processes
    for the leading per-document steps; the output is the same for any number of workers."""
    n_parallel = 0
    while n_parallel < len(cfg.steps) and cfg.steps[n_parallel].type in PARALLEL_STEPS:
        n_parallel += 1
    if cfg.workers <= 1 or n_parallel == 0:
        for doc, weight in docs:
            kept, trace = _apply_steps(doc, steps)
            yield doc, weight, kept, trace
        return
    serial = steps[n_parallel:]
    configs = [c.model_dump(mode="json") for c in cfg.steps[:n_parallel]]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(configs, base_dir)) as pool:
        chunks = _chunks(docs, 64)
        pending = ((chunk, [d for d, _ in chunk]) for chunk in chunks)
        batches = ((chunk, pool.apply_async(_worker_chunk, (plain,))) for chunk, plain in pending)
        window: list = []
        for item in batches:  # keep a few chunks in flight, collect in order
            window.append(item)
            if len(window) < 2 * cfg.workers:
                continue
            yield from _drain(window.pop(0), serial, counts)
        for item in window:
            yield from _drain(item, serial, counts)


def _drain(item, serial, counts):
    chunk, future = item
    results, gained = future.get()
    for name, extra in gained.items():
        counts[name].update(extra)
    for (doc, weight), (kept, trace) in zip(chunk, results, strict=True):
        if kept is not None and serial:
            kept, more = _apply_steps(kept, serial)
            trace = trace + more
        yield doc, weight, kept, trace


def build_corpus(cfg: DataConfig, base_dir: Path, out: Path) -> dict[str, Any]:
    """Clean, split and write `train.jsonl`, `validation.jsonl` and `removed.jsonl` in one pass.

    Returns per-split, per-source counts, per-step statistics and the licence of each source.
    """
    stats: dict[str, dict[str, dict[str, int]]] = {s: defaultdict(lambda: {"documents": 0, "bytes": 0}) for s in SPLITS}
    before: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0})
    steps = build_steps(cfg.steps, base_dir)
    mixing: dict[str, dict[str, float]] = defaultdict(lambda: {"weight": 1.0, "documents_in": 0, "documents_out": 0})
    step_stats: dict[str, dict[str, Any]] = {name: _new_stats() for name, _ in steps}
    worker_counts: dict[str, Counter[str]] = defaultdict(Counter)
    licenses: dict[str, str] = {}
    seen: dict[str, str] = {}
    rejects: Counter[str] = Counter()
    skipped_files: list[str] = []
    with ExitStack() as stack:
        rejects_file = stack.enter_context(open(out / "rejects.jsonl", "w", encoding="utf-8"))

        def reject(bad: BadRecord) -> None:
            rejects[bad.reason.split(" (")[0]] += 1
            rejects_file.write(json.dumps({"where": bad.where, "reason": bad.reason}, ensure_ascii=False) + "\n")

        def file_error(error: InputError) -> None:
            if cfg.on_error != "skip":
                raise error
            skipped_files.append(str(error))
            logger.warning("skipped: %s", error)

        def checked() -> Iterator[tuple[Document, float]]:
            for doc, weight in iter_documents(cfg, base_dir, reject, file_error):
                where = _location(doc)
                if doc["id"] in seen:
                    raise InputError(f"{where}: duplicate document id {doc['id']!r} (first seen at {seen[doc['id']]})")
                seen[doc["id"]] = where
                licenses.setdefault(doc["source"], doc["license"])
                before[doc["source"]]["documents"] += 1
                before[doc["source"]]["bytes"] += len(doc["text"].encode("utf-8"))
                yield doc, weight

        files = {s: stack.enter_context(open(out / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        removed_file = stack.enter_context(open(out / "removed.jsonl", "w", encoding="utf-8"))
        for doc, weight, kept, trace in _cleaned(cfg, base_dir, checked(), steps, worker_counts):
            step_name, reason = _record(step_stats, doc["source"], trace)
            if kept is None:
                record = {"id": doc["id"], "source": doc["source"], "where": _location(doc), "step": step_name,
                          "reason": reason}  # fmt: skip
                if cfg.keep_removed_text:
                    record["text"] = doc["text"]
                removed_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            split = "validation" if in_validation(kept["metadata"]["split_key"], cfg.validation_fraction) else "train"
            n = copies(kept["id"], weight)
            mix = mixing[kept["source"]]
            mix["weight"] = weight
            mix["documents_in"] += 1
            mix["documents_out"] += n
            for k in range(n):
                files[split].write(json.dumps(kept if k == 0 else _repeat(kept, k + 1), ensure_ascii=False) + "\n")
            if n:
                entry = stats[split][kept["source"]]
                entry["documents"] += n
                entry["bytes"] += n * len(kept["text"].encode("utf-8"))
    for name, step in steps:
        if hasattr(step, "counts"):
            step_stats[name]["counts"] = dict(Counter(dict(step.counts)) + worker_counts[name])
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
        "rejects": dict(sorted(rejects.items())),
        "skipped_files": skipped_files,
        "documents": {s: sum(v["documents"] for v in stats[s].values()) for s in SPLITS},
        "bytes": {s: sum(v["bytes"] for v in stats[s].values()) for s in SPLITS},
    }
    metrics["length_histogram"] = length_histogram([out / f"{s}.jsonl" for s in SPLITS], out / "lengths.png")
    (out / "data_card.md").write_text(data_card(metrics, cfg.model_dump(mode="json")))
    return metrics
