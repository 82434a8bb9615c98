"""The data stage: gather documents from every source, split them and record per-source statistics."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import chain, islice
from pathlib import Path
from typing import Any

from clearlm.data import builtin
from clearlm.data.documents import Document, in_validation
from clearlm.data.sources import files_digest, read_source, source_files, source_root
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


def iter_documents(cfg: DataConfig, base_dir: Path) -> Iterator[Document]:
    streams = [builtin.stdlib_documents()] if cfg.builtin else []
    streams += [read_source(src, base_dir) for src in cfg.sources]
    docs = chain.from_iterable(streams)
    return islice(docs, cfg.max_documents) if cfg.max_documents else docs


def _location(doc: Document) -> str:
    meta = doc["metadata"]
    if "line" in meta:
        return f"{meta['file']}:{meta['line']}"
    return str(meta.get("file") or meta.get("path") or doc["source"])


def build_corpus(cfg: DataConfig, base_dir: Path, out: Path) -> dict[str, Any]:
    """Write `train.jsonl` and `validation.jsonl` in one pass; return per-split, per-source counts."""
    stats: dict[str, dict[str, dict[str, int]]] = {s: defaultdict(lambda: {"documents": 0, "bytes": 0}) for s in SPLITS}
    licenses: dict[str, str] = {}
    seen: dict[str, str] = {}
    with ExitStack() as stack:
        files = {s: stack.enter_context(open(out / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        for doc in iter_documents(cfg, base_dir):
            where = _location(doc)
            if doc["id"] in seen:
                raise InputError(f"{where}: duplicate document id {doc['id']!r} (first seen at {seen[doc['id']]})")
            seen[doc["id"]] = where
            is_val = in_validation(doc["metadata"]["split_key"], cfg.validation_fraction)
            split = "validation" if is_val else "train"
            files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
            entry = stats[split][doc["source"]]
            entry["documents"] += 1
            entry["bytes"] += len(doc["text"].encode("utf-8"))
            licenses.setdefault(doc["source"], doc["license"])
    for split in SPLITS:
        if not stats[split]:
            raise InputError(
                f"the {split} split is empty: add documents or change data.validation_fraction "
                f"({cfg.validation_fraction})"
            )
    return {
        "splits": {s: dict(sorted(stats[s].items())) for s in SPLITS},
        "licenses": dict(sorted(licenses.items())),
        "documents": {s: sum(v["documents"] for v in stats[s].values()) for s in SPLITS},
        "bytes": {s: sum(v["bytes"] for v in stats[s].values()) for s in SPLITS},
    }
