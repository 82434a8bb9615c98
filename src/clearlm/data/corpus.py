"""The data stage: gather documents from every source, clean them, deduplicate, mix and split.

It runs in three passes so that it can be parallel, resumable and still deterministic:
1. clean: documents are read in corpus order and cut into parts of `PART_DOCUMENTS`; each part's
   documents go through every step on the executor (here, worker processes or Ray) and the part is
   written to `work/part-NNNNN.jsonl` under a temporary name, then renamed. An interrupted run
   finds its finished parts (checked against the documents they should hold) and skips them.
2. dedup: the keys that the dedup steps recorded are gathered and each dedup step decides, over
   the whole corpus, which documents go (`dedup.resolve`).
3. write: the parts are read again in order; kept documents are mixed and split into `train.jsonl`
   and `validation.jsonl`, removed ones listed in `removed.jsonl`, and the statistics gathered.
The output is byte-identical whatever the number of workers, the executor or the interruptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from clearlm.data import builtin
from clearlm.data.card import data_card
from clearlm.data.clean import Record, Trace, trace_of
from clearlm.data.dedup import ExactDedup, MinHashDedup
from clearlm.data.documents import Document, in_fraction
from clearlm.data.executor import Executor
from clearlm.data.plots import length_histogram
from clearlm.data.sources import FIXED_SPLIT, BadRecord, read_source
from clearlm.data.steps import build_steps
from clearlm.errors import InputError
from clearlm.recipe import DataConfig
from clearlm.stages import StageRun

SPLITS = ("train", "validation")
PART_DOCUMENTS = 1000  # documents per part file: the unit of resuming
CHUNK_DOCUMENTS = 50  # documents per task sent to a worker
logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, tuple[int, int]]], None]  # step -> (documents, bytes) so far


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
    streams = []
    if cfg.builtin:  # each built-in domain at its own weight, where the recipe gives one
        weights = cfg.builtin_weights
        streams.append((doc, weights.get(doc["source"], cfg.builtin_weight)) for doc in builtin.stdlib_documents())
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


class _Reader:
    """The documents in corpus order, checked (unique ids) and counted as they are read."""

    def __init__(self, cfg: DataConfig, base_dir: Path, rejects_file: Any) -> None:
        self.cfg, self.base_dir, self.rejects_file = cfg, base_dir, rejects_file
        self.seen: dict[str, str] = {}
        self.before: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0})
        self.licenses: dict[str, str] = {}
        self.rejects: Counter[str] = Counter()
        self.skipped_files: list[str] = []

    def _reject(self, bad: BadRecord) -> None:
        self.rejects[bad.reason.split(" (")[0]] += 1
        self.rejects_file.write(json.dumps({"where": bad.where, "reason": bad.reason}, ensure_ascii=False) + "\n")

    def _file_error(self, error: InputError) -> None:
        if self.cfg.on_error != "skip":
            raise error
        self.skipped_files.append(str(error))
        logger.warning("skipped: %s", error)

    def documents(self) -> Iterator[tuple[Document, float]]:
        for doc, weight in iter_documents(self.cfg, self.base_dir, self._reject, self._file_error):
            where = _location(doc)
            if doc["id"] in self.seen:
                raise InputError(f"{where}: duplicate document id {doc['id']!r} (first seen at {self.seen[doc['id']]})")
            self.seen[doc["id"]] = where
            self.licenses.setdefault(doc["source"], doc["license"])
            self.before[doc["source"]]["documents"] += 1
            self.before[doc["source"]]["bytes"] += len(doc["text"].encode("utf-8"))
            yield doc, weight


def _part_path(work: Path, k: int) -> Path:
    return work / f"part-{k:05d}.jsonl"


def _finished(path: Path, header: dict[str, Any]) -> bool:
    """A part counts as done only if it was renamed into place and holds the expected documents."""
    if not path.exists():
        return False
    with open(path, encoding="utf-8") as f:
        try:
            return json.loads(f.readline()) == header
        except ValueError:
            return False


def _write_part(path: Path, header: dict[str, Any], records: list[Record]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def _part_records(work: Path, k: int) -> Iterator[Record]:
    with open(_part_path(work, k), encoding="utf-8") as f:
        next(f)
        for line in f:
            yield json.loads(line)


def _clean_parts(
    docs: Iterator[tuple[Document, float]], work: Path, executor: Executor, progress: Progress | None
) -> tuple[int, int]:
    """Pass 1: clean every part not already finished; returns (parts, parts found finished)."""
    n_parts, n_resumed = 0, 0
    seen: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def chunks() -> Iterator[tuple[tuple[int, dict[str, Any], list[float], bool], list[Document]]]:
        nonlocal n_parts, n_resumed
        while part := list(islice(docs, PART_DOCUMENTS)):
            k, n_parts = n_parts, n_parts + 1
            header = {"part": k, "documents": len(part), "first": part[0][0]["id"], "last": part[-1][0]["id"]}
            if _finished(_part_path(work, k), header):
                n_resumed += 1
                continue
            for i in range(0, len(part), CHUNK_DOCUMENTS):
                piece = part[i : i + CHUNK_DOCUMENTS]
                last = i + CHUNK_DOCUMENTS >= len(part)
                yield (k, header, [w for _, w in piece], last), [d for d, _ in piece]

    records: list[Record] = []
    for (k, header, weights, last), cleaned in executor.map(chunks()):
        for record, weight in zip(cleaned, weights, strict=True):
            record["weight"] = weight
            trace = trace_of(record)
            seen["read"][0] += 1
            seen["read"][1] += trace[0].bytes_in if trace else len(record["doc"]["text"].encode("utf-8"))
            for entry in trace:
                seen[entry.step][0] += 1
                seen[entry.step][1] += entry.bytes_in
        records += cleaned
        if progress is not None:
            progress({name: (n, b) for name, (n, b) in seen.items()})
        if last:
            _write_part(_part_path(work, k), header, records)
            records = []
    return n_parts, n_resumed


def _deduplicate(
    steps: list[tuple[str, Any]], work: Path, n_parts: int
) -> tuple[dict[int, tuple[int, str, int]], dict[str, dict[str, int]]]:
    """Pass 2: each dedup step, in recipe order, over the documents that reached it.

    Returns {corpus index: (step position, reason, index of the document kept in its place)} for the
    documents removed, and per-step counts."""
    dedup = [(pos, name, step) for pos, (name, step) in enumerate(steps) if isinstance(step, ExactDedup | MinHashDedup)]
    if not dedup:
        return {}, {}
    found: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {pos: ([], []) for pos, _, _ in dedup}
    index = 0
    for k in range(n_parts):
        part: dict[int, tuple[list[int], list[Any]]] = {pos: ([], []) for pos, _, _ in dedup}
        for record in _part_records(work, k):
            trace = trace_of(record)
            for pos, _, _ in dedup:
                if pos < len(trace) and trace[pos].extra is not None:
                    part[pos][0].append(index)
                    part[pos][1].append(trace[pos].extra)
            index += 1
        for pos, (indices, keys) in part.items():
            width = len(keys[0]) if keys and isinstance(keys[0], list) else None
            found[pos][0].append(np.asarray(indices, dtype=np.int64))
            found[pos][1].append(np.asarray(keys, dtype=np.uint64).reshape((len(keys), width) if width else len(keys)))
    removed: dict[int, tuple[int, str, int]] = {}
    counts: dict[str, dict[str, int]] = {}
    for pos, name, step in dedup:
        parts = [(i, k) for i, k in zip(*found[pos], strict=True) if len(i)]
        if not parts:
            counts[name] = {}
            continue
        indices, keys = np.concatenate([i for i, _ in parts]), np.concatenate([k for _, k in parts])
        alive = np.fromiter((i not in removed for i in indices.tolist()), dtype=bool, count=len(indices))
        gone, step_counts = step.resolve(indices[alive], keys[alive])
        removed.update({index: (pos, step.reason, original) for index, original in gone.items()})
        counts[name] = dict(step_counts)
    return removed, counts


def _new_stats() -> dict[str, Any]:
    return {"documents_in": 0, "removed": 0, "bytes_in": 0, "bytes_out": 0, "reasons": Counter(),
            "removed_by_source": Counter(), "counts": Counter()}  # fmt: skip


def _record(
    step_stats: dict[str, dict[str, Any]], source: str, trace: Trace, dedup: set[str]
) -> tuple[str | None, str | None]:
    for step in trace:
        entry = step_stats[step.step]
        entry["documents_in"] += 1
        entry["bytes_in"] += step.bytes_in
        if step.reason is not None:
            entry["removed"] += 1
            entry["reasons"][step.reason] += 1
            entry["removed_by_source"][source] += 1
            return step.step, step.reason
        entry["bytes_out"] += step.bytes_out
        if step.extra and step.step not in dedup:
            entry["counts"].update(step.extra)
    return None, None


def build_corpus(cfg: DataConfig, base_dir: Path, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Clean, deduplicate, mix and split into `train.jsonl` and `validation.jsonl`, listing removed
    documents in `removed.jsonl` and bad records in `rejects.jsonl`. Resumes from `out/work` parts.

    Returns per-split, per-source counts, per-step statistics and the licence of each source.
    """
    steps = build_steps(cfg.steps, base_dir)  # fails on a missing dependency before anything is read
    dedup_names = {name for name, step in steps if isinstance(step, ExactDedup | MinHashDedup)}
    work = out / "work"
    work.mkdir(exist_ok=True)
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects_file, Executor(cfg, base_dir) as executor:
        reader = _Reader(cfg, base_dir, rejects_file)
        n_parts, n_resumed = _clean_parts(reader.documents(), work, executor, progress)
    if n_resumed:
        logger.info("resumed: %d of %d parts were already cleaned", n_resumed, n_parts)
    removed_at, dedup_counts = _deduplicate(steps, work, n_parts)

    stats: dict[str, dict[str, dict[str, int]]] = {s: defaultdict(lambda: {"documents": 0, "bytes": 0}) for s in SPLITS}
    mixing: dict[str, dict[str, float]] = defaultdict(lambda: {"weight": 1.0, "documents_in": 0, "documents_out": 0})
    step_stats: dict[str, dict[str, Any]] = {name: _new_stats() for name, _ in steps}
    with ExitStack() as stack:
        files = {s: stack.enter_context(open(out / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        removed_file = stack.enter_context(open(out / "removed.jsonl", "w", encoding="utf-8"))
        records = chain.from_iterable(_part_records(work, k) for k in range(n_parts))
        originals = {original for _, _, original in removed_at.values()}
        ids: dict[int, str] = {}  # the kept documents that removed ones duplicate
        for index, record in enumerate(records):
            doc, trace = record["doc"], trace_of(record)
            if index in originals:
                ids[index] = doc["id"]
            duplicate_of = None
            if index in removed_at:
                pos, reason, duplicate_of = removed_at[index]
                trace = [*trace[:pos], trace[pos]._replace(bytes_out=None, reason=reason, extra=None)]
            step_name, reason = _record(step_stats, doc["source"], trace, dedup_names)
            if step_name is not None:
                if not in_fraction(f"removed:{doc['id']}", cfg.removed_sample):
                    continue
                entry = {"id": doc["id"], "source": doc["source"], "where": _location(doc), "step": step_name,
                         "reason": reason}  # fmt: skip
                if duplicate_of is not None:
                    entry["duplicate_of"] = ids[duplicate_of]
                if cfg.keep_removed_text:
                    entry["text"] = record["original"]
                removed_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                continue
            split = doc["metadata"].get(FIXED_SPLIT)
            if split not in SPLITS:
                split = "validation" if in_fraction(doc["metadata"]["split_key"], cfg.validation_fraction) else "train"
            weight = record["weight"]
            n = copies(doc["id"], weight)
            mix = mixing[doc["source"]]
            mix["weight"] = weight
            mix["documents_in"] += 1
            mix["documents_out"] += n
            for k in range(n):
                files[split].write(json.dumps(doc if k == 0 else _repeat(doc, k + 1), ensure_ascii=False) + "\n")
            if n:
                entry = stats[split][doc["source"]]
                entry["documents"] += n
                entry["bytes"] += n * len(doc["text"].encode("utf-8"))
    shutil.rmtree(work)
    for name, counts in dedup_counts.items():
        step_stats[name]["counts"].update(counts)
    for split in SPLITS:
        if not stats[split]:
            raise InputError(
                f"the {split} split is empty: add documents or change data.validation_fraction "
                f"({cfg.validation_fraction})"
            )
    metrics = {
        "splits": {s: dict(sorted(stats[s].items())) for s in SPLITS},
        "before_steps": dict(sorted(reader.before.items())),
        "steps": {
            name: {**v, **{k: dict(v[k]) for k in ("reasons", "removed_by_source", "counts")}}
            for name, v in step_stats.items()
        },
        "licenses": dict(sorted(reader.licenses.items())),
        "mixing": dict(sorted(mixing.items())),
        "rejects": dict(sorted(reader.rejects.items())),
        "skipped_files": reader.skipped_files,
        "documents": {s: sum(v["documents"] for v in stats[s].values()) for s in SPLITS},
        "bytes": {s: sum(v["bytes"] for v in stats[s].values()) for s in SPLITS},
    }
    metrics["length_histogram"] = length_histogram([out / f"{s}.jsonl" for s in SPLITS], out / "lengths.png")
    (out / "data_card.md").write_text(data_card(metrics, cfg.model_dump(mode="json")))
    (out / "data_card.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics


def build_stage(run: StageRun, out: Path) -> dict[str, Any]:
    """The data stage: the recipe's `[data]` corpus, cleaned and split (finished parts kept for a re-run)."""
    return build_corpus(run.recipe.data, run.base_dir, out, run.reporter.data_progress)
