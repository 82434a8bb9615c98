"""The trace index: every document of the training corpora (pretraining's and mid-training's token shards) and every
sequence post-training trained on (SFT examples, DPO pairs' chosen and rejected sequences, RL prompts: `trained.py`),
with its stage, id, source and licence, in infini-gram's on-disk format (version 4), so that infini-gram's engine, and
OLMoTrace's span finder (`attribute`), query it unchanged.

The files, as infini-gram's indexer writes them: `tokenized.0` (each document as a separator, the all-ones token,
then its token ids, little-endian), `offset.0` (each document's byte offset, u64), `metadata.0` and `metaoff.0`
(a JSON line per document and its offset) and `table.0`, the suffix array: the byte offset of every token position,
ordered as the engine's binary search compares them (the bytes that follow, lexicographically), each in the fewest
whole bytes that hold the file's size. It is built here with libdivsufsort (`pydivsufsort`) over the file's bytes,
keeping the positions on token boundaries, rather than by infini-gram's own indexer: that one asks for 2^35 bytes of
memory for 32-bit token ids and fails on corpora of a few documents (both seen on this machine), and this way the
index needs no infini-gram to build, only to query.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clearlm.artifacts import Artifact
from clearlm.errors import ArtifactError
from clearlm.stages import StageRun, table
from clearlm.train.trained import DTYPE, STEM

INDEX_FILES = ("tokenized.0", "offset.0", "metadata.0", "metaoff.0", "table.0")


def index_dtype(max_token_id: int) -> np.dtype:
    """u16 unless a token id reaches the separator (0xFFFF), as infini-gram's `token_dtype` choice."""
    return np.dtype(np.uint16) if max_token_id < 0xFFFF else np.dtype(np.uint32)


def write_index(documents: list[tuple[np.ndarray, dict[str, Any]]], dtype: np.dtype, out: Path) -> dict[str, Any]:
    """Write the index of `documents` (token ids, metadata) into `out`; its size."""
    from pydivsufsort import divsufsort

    out.mkdir(parents=True, exist_ok=True)
    separator = np.array([np.iinfo(dtype).max], dtype=dtype).tobytes()
    position, meta_position, tokens = 0, 0, 0
    with (open(out / "tokenized.0", "wb") as data, open(out / "offset.0", "wb") as offsets,
          open(out / "metadata.0", "wb") as metadata, open(out / "metaoff.0", "wb") as metaoffsets):  # fmt: skip
        for ids, meta in documents:
            body = separator + np.ascontiguousarray(ids, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()
            line = (json.dumps(meta, ensure_ascii=False) + "\n").encode("utf-8")
            offsets.write(np.uint64(position).tobytes())
            metaoffsets.write(np.uint64(meta_position).tobytes())
            data.write(body)
            metadata.write(line)
            position, meta_position, tokens = position + len(body), meta_position + len(line), tokens + len(ids)
    raw = np.fromfile(out / "tokenized.0", dtype=np.uint8)  # a writable copy: divsufsort refuses read-only memory
    order = divsufsort(raw) if len(raw) else np.zeros(0, dtype=np.int64)
    order = order[order % dtype.itemsize == 0].astype("<u8")
    width = max(1, math.ceil(math.log2(position + 1) / 8))  # bytes a pointer takes
    with open(out / "table.0", "wb") as table:  # Python's write, not numpy's tofile: a full disk reads as one
        table.write(np.ascontiguousarray(order.view(np.uint8).reshape(-1, 8)[:, :width]).data)
    return {"documents": len(documents), "tokens": tokens, "bytes": position, "pointer_bytes": width,
            "token_dtype": dtype.name}  # fmt: skip


def corpus_documents(folder: Path, stem: str, dtype: str, stage: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """The documents of `folder`'s `stem`.bin and `stem`.docs.jsonl as trained on (a corpus document's end-of-text
    token included), with their provenance."""
    tokens = np.memmap(folder / f"{stem}.bin", dtype=np.dtype(dtype), mode="r")
    with open(folder / f"{stem}.docs.jsonl", encoding="utf-8") as spans:
        for line in spans:
            doc = json.loads(line)
            meta = {"stage": stage, **{k: v for k, v in doc.items() if k not in ("start", "end")}}
            yield np.asarray(tokens[doc["start"] : doc["end"]]), meta


def training_sets(artifacts: dict[str, Artifact]) -> Iterator[tuple[str, Path, str, str, int]]:
    """(stage, folder, file stem, token dtype, end-of-text id) of each set of trained tokens among `artifacts`: the
    corpora's training splits, the post-training stages' trained sequences, in training order."""
    for s in table():
        if s.indexed_as and s.name in artifacts:
            path, m = artifacts[s.name].path, artifacts[s.name].metrics
            if s.model:
                yield s.indexed_as, path, STEM, DTYPE, int(m["trained"]["eos_id"])
            else:
                yield s.indexed_as, path, "train", m["dtype"], int(m["eos_id"])


def build_stage(run: StageRun, out: Path) -> dict[str, Any]:
    """The `trace` stage: the index of everything the released model was trained on."""
    documents, per_stage, eos, top = [], {}, set(), 0
    for stage, folder, stem, dtype, eos_id in training_sets(run.inputs):
        docs = list(corpus_documents(folder, stem, dtype, stage))
        per_stage[stage] = {"documents": len(docs), "tokens": int(sum(len(ids) for ids, _ in docs))}
        top = max([top, *(int(ids.max()) for ids, _ in docs if len(ids))])
        documents += docs
        eos.add(eos_id)
    if not documents:
        raise ArtifactError("the trace index has no training documents to index")
    size = write_index(documents, index_dtype(top), out)
    info = {**size, "eos_id": min(eos), "stages": per_stage}
    (out / "index.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
