"""What a post-training stage trained on, kept for the trace index: each trained token sequence (an SFT example as
truncated, a DPO pair's prompt with its chosen and with its rejected answer, an RL prompt) with the row it came from
(file and line, or the built-in set's item), its source and licence.

Written in the token shards' layout (`trained.bin`, little-endian u32 ids, and `trained.docs.jsonl`, a span per
sequence with its provenance), so the trace index reads post-training data as it reads a corpus."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STEM = "trained"  # trained.bin, trained.docs.jsonl
DTYPE = "<u4"


def origin(source: str, license: str, where: str) -> dict[str, str]:
    """A row's provenance: `where` is its place in `source` (":12" for line 12, " item 3" in a .json array)."""
    return {"id": f"{source}{where}", "source": source, "license": license}


def write_trained(out: Path, sequences: Iterable[tuple[Sequence[int], dict[str, Any]]], eos_id: int) -> dict[str, int]:
    """Write the sequences (token ids, provenance) into `out`; their count, tokens and end-of-text id (metrics)."""
    start = count = 0
    with open(out / f"{STEM}.bin", "wb") as data, open(out / f"{STEM}.docs.jsonl", "w", encoding="utf-8") as docs:
        for ids, meta in sequences:
            data.write(np.asarray(ids, dtype=DTYPE).tobytes())
            docs.write(json.dumps({**meta, "start": start, "end": start + len(ids)}, ensure_ascii=False) + "\n")
            start, count = start + len(ids), count + 1
    return {"sequences": count, "tokens": start, "eos_id": eos_id}
