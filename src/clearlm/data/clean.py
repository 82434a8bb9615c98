"""The per-document half of the data stage: every step applied to one document, in recipe order.

This is what worker processes and Ray actors run. A dedup step cannot decide alone, so here it only
records the document's key at its place in the recipe; `corpus` decides after all keys are in.
The trace says what each step did, so statistics and removal reasons can be computed afterwards:
one `TraceEntry` per step the document reached (a JSON list in the stage's part files).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from clearlm.data.dedup import DedupStep, ExactDedup, MinHashDedup
from clearlm.data.documents import Document
from clearlm.data.steps import Counted, Removed, Step


class TraceEntry(NamedTuple):
    """What one step did to a document."""

    step: str
    bytes_in: int
    bytes_out: int | None  # None: the step removed the document
    reason: str | None  # why it was removed
    extra: Any  # a step's counts (PII masks), or a dedup step's key


Trace = list[TraceEntry]
Record = dict[str, Any]


def trace_of(record: Record) -> Trace:
    """A record's trace as entries (records read back from a part file hold plain lists)."""
    return [TraceEntry(*entry) for entry in record["trace"]]


def clean(doc: Document, steps: list[tuple[str, Step | DedupStep]]) -> tuple[Document | None, Trace]:
    trace: Trace = []
    size = len(doc["text"].encode("utf-8"))
    for name, step in steps:
        if isinstance(step, ExactDedup | MinHashDedup):
            trace.append(TraceEntry(name, size, size, None, step.key(doc)))
            continue
        result = step(doc)
        if isinstance(result, Removed):
            trace.append(TraceEntry(name, size, None, result.reason, None))
            return None, trace
        counts = None
        if isinstance(result, Counted):
            result, counts = result.doc, result.counts
        size_out = size if result is doc else len(result["text"].encode("utf-8"))
        trace.append(TraceEntry(name, size, size_out, None, counts))
        doc, size = result, size_out
    return doc, trace


def clean_chunk(docs: list[Document], steps: list[tuple[str, Step | DedupStep]], keep_text: bool) -> list[Record]:
    """One record per document: the cleaned document (or, when a step removed it, its id, source and
    metadata), the trace, and the original text when removed documents keep theirs."""
    records = []
    for doc in docs:
        kept, trace = clean(doc, steps)
        record: Record = {"doc": kept or {k: v for k, v in doc.items() if k != "text"}, "trace": trace}
        if keep_text:
            record["original"] = doc["text"]
        records.append(record)
    return records
