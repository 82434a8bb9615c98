"""The contamination audit: for each evaluated task, the share of its items that share a 13-gram of tokens with the
training data, looked up in the release's trace index (GPT-3's and OLMo's 13-gram overlap; the data stage's
decontamination remains the filter that removes such documents, this is the check of what got through)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from clearlm.trace.query import TraceIndex, longest_matches

NGRAM = 13


def overlaps(index: TraceIndex, ids: list[int], n: int = NGRAM) -> bool:
    """Whether any n tokens in a row of `ids` occur in the index."""
    return len(ids) >= n and max(longest_matches(index.search, ids)) >= n


def items(samples: Path) -> dict[str, dict[Any, str]]:
    """Each task's items' text (their context or prompt) from the evaluation's samples, by task and item id."""
    out: dict[str, dict[Any, str]] = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = row.get("context") or row.get("prompt")
        if isinstance(text, str) and "task" in row:
            out.setdefault(row["task"], {}).setdefault(row.get("doc_id"), text)
    return out


def contamination(index: TraceIndex, tok: Tokenizer, samples: Path, n: int = NGRAM) -> dict[str, dict[str, Any]]:
    """Per task: items, those with an n-gram in the training data, their share."""
    table = {}
    for task, texts in sorted(items(samples).items()):
        found = sum(overlaps(index, tok.encode(t, add_special_tokens=False).ids, n) for t in texts.values())
        table[task] = {"items": len(texts), "contaminated": found, "share": found / len(texts), "ngram": n}
    return table


def card_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    if not table:
        return []
    rows = [f"| {task} | {t['items']} | {t['contaminated']} | {t['share']:.1%} |" for task, t in table.items()]
    title = f"Contamination audit ({NGRAM}-gram overlap of each evaluated item with the training data, trace index):"
    return ["", title, "", "| task | items | with an overlap | share |", "|---|---|---|---|", *rows, ""]


def report_rows(table: dict[str, dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{escape(task)}</td><td>{t['items']}</td><td>{t['contaminated']}</td>"
                   f"<td>{t['share']:.1%}</td></tr>" for task, t in table.items())  # fmt: skip
    return (f"<table><tr><th>task</th><th>items</th><th>with a {NGRAM}-gram in the training data</th><th>share</th>"
            f"</tr>{rows}</table>") if table else ""  # fmt: skip
