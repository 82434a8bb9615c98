"""Documents with Dolma's field names, plus the licence each one carries through to the release."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict, TypeVar

T = TypeVar("T")


class Document(TypedDict):
    id: str
    text: str
    source: str
    added: str
    created: str
    license: str
    metadata: dict[str, Any]


def in_fraction(key: str, fraction: float) -> bool:
    """A stable draw (the validation split, the removed-document sample): the same key gives the same
    answer on every machine and Python version."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return bucket < fraction * 2**64


def hold_out(items: list[T], key: Callable[[T], Any], fraction: float) -> tuple[list[T], list[T]]:
    """(kept, held out): an item is held out by a hash of its content (`key(item)` as JSON), so adding or reordering
    items never moves another across the split, and duplicates land on the same side."""
    kept: list[T] = []
    held: list[T] = []
    for item in items:
        (held if in_fraction("held-out:" + json.dumps(key(item), sort_keys=True), fraction) else kept).append(item)
    return kept, held


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
