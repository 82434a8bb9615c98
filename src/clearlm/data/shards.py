"""Token shards: a flat memmap of token ids per split, document offsets beside it, and the sampler.

Each document is followed by the end-of-text token. Training windows are fixed slices of
`context + 1` tokens; their order is a permutation fixed by (seed, epoch), so the position in the
stream (a single integer) is the whole data-loader state, whatever the number of processes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from clearlm.data.corpus import SPLITS
from clearlm.data.documents import read_jsonl
from clearlm.data.tokenizer import load_tokenizer
from clearlm.stages import StageRun

_BATCH_DOCS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    docs = read_jsonl(path)
    while batch := list(islice(docs, _BATCH_DOCS)):
        yield batch


def write_shards(tok: Tokenizer, eos_id: int, data_dir: Path, out: Path) -> dict[str, Any]:
    """Write `<split>.bin` (token ids), `<split>.idx.npy` (document start offsets, plus the end) and
    `<split>.docs.jsonl` (each document's id, source, licence and token span), so any training token
    can be traced back to the document, source and licence it came from."""
    dtype = token_dtype(tok.get_vocab_size())
    metrics: dict[str, Any] = {"dtype": dtype.name, "eos_id": eos_id}
    for split in SPLITS:
        offsets, total, n_bytes = [0], 0, 0
        sources: dict[str, dict[str, int]] = {}
        with open(out / f"{split}.bin", "wb") as f, open(out / f"{split}.docs.jsonl", "w", encoding="utf-8") as index:
            for docs in _batches(data_dir / f"{split}.jsonl"):
                texts = [d["text"] for d in docs]
                n_bytes += sum(len(t.encode("utf-8")) for t in texts)
                for doc, enc in zip(docs, tok.encode_batch(texts, add_special_tokens=False), strict=True):
                    ids = np.asarray([*enc.ids, eos_id], dtype=dtype)
                    f.write(ids.tobytes())
                    span = {"id": doc["id"], "source": doc["source"], "license": doc["license"],
                            "start": total, "end": total + len(ids)}  # fmt: skip
                    index.write(json.dumps(span, ensure_ascii=False) + "\n")
                    per_source = sources.setdefault(doc["source"], {"documents": 0, "tokens": 0})
                    per_source["documents"] += 1
                    per_source["tokens"] += len(ids)
                    total += len(ids)
                    offsets.append(total)
        npy = io.BytesIO()  # written by Python, not numpy's tofile, whose full-disk error has no errno
        np.save(npy, np.asarray(offsets, dtype=np.int64))
        (out / f"{split}.idx.npy").write_bytes(npy.getvalue())
        metrics[split] = {
            "tokens": total,
            "documents": len(offsets) - 1,
            "bytes_per_token": n_bytes / max(total, 1),
            "sources": dict(sorted(sources.items())),
        }
    return metrics


def window_documents(shards_dir: Path, split: str, spans: list[tuple[int, int]]) -> list[str]:
    """The ids of the documents that the token spans [start, end) overlap, in document order."""
    offsets = np.load(shards_dir / f"{split}.idx.npy")
    wanted: set[int] = set()
    for start, end in spans:
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, end - 1, side="right")) - 1
        wanted.update(range(first, last + 1))
    return [doc["id"] for i, doc in enumerate(read_jsonl(shards_dir / f"{split}.docs.jsonl")) if i in wanted]


def open_tokens(shards_dir: Path, split: str, dtype: str) -> np.memmap:
    return np.memmap(shards_dir / f"{split}.bin", dtype=np.dtype(dtype), mode="r")


class WindowSampler:
    """Fixed windows of `context + 1` tokens, visited in an order fixed by (seed, epoch)."""

    def __init__(self, tokens: np.ndarray, context: int, seed: int) -> None:
        self.tokens, self.context, self.seed = tokens, context, seed
        self.n_windows = (len(tokens) - 1) // context
        if self.n_windows < 1:
            raise ValueError(f"only {len(tokens)} tokens: fewer than one window of {context + 1}")
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def window(self, index: int) -> np.ndarray:
        start = index * self.context
        return self.tokens[start : start + self.context + 1]

    def span(self, position: int) -> tuple[int, int]:
        """The token offsets [start, end) of the window at `position` of the shuffled stream."""
        epoch, offset = divmod(position, self.n_windows)
        start = int(self.permutation(epoch)[offset]) * self.context
        return start, start + self.context + 1

    def batch(self, position: int, size: int) -> torch.Tensor:
        """Windows `position ..` of the endless shuffled stream, as int64 [size, context + 1]."""
        rows = [self.tokens[slice(*self.span(pos))] for pos in range(position, position + size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def sequential(self, first: int, size: int) -> torch.Tensor:
        """Unshuffled windows (for validation), wrapping around the end."""
        rows = [self.window(i % self.n_windows) for i in range(first, first + size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def build_stage(run: StageRun, out: Path) -> dict[str, Any]:
    """The shards stage: both splits tokenised with the tokenizer stage's tokenizer."""
    tok = load_tokenizer(run.inputs["tokenizer"].path)
    return write_shards(tok, tok.token_to_id(run.recipe.tokenizer.eos_token), run.inputs["data"].path, out)
