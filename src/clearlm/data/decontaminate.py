"""Decontamination: drop training documents that share a word n-gram with an evaluation set.

The evaluation texts are each task item's prompt plus its gold answer (built with the same task
definitions `clearlm eval` uses), or whole documents of other jsonl/txt sets. Words are lower-cased
alphanumeric runs, so punctuation and spacing differences do not hide an overlap.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from clearlm.data.documents import Document
from clearlm.data.sources import read_source
from clearlm.data.steps import Removed, Result
from clearlm.eval.taskspec import load_docs, resolve_tasks
from clearlm.recipe import DecontaminateConfig, SourceConfig

_WORD = re.compile(r"[^\W_]+")


def ngrams(text: str, n: int) -> set[bytes]:
    """Stable 64-bit digests of the text's word n-grams (the same in every process)."""
    words = _WORD.findall(text.lower())
    return {hashlib.blake2b(" ".join(words[i : i + n]).encode(), digest_size=8).digest()
            for i in range(len(words) - n + 1)}  # fmt: skip


def _task_texts(cfg: DecontaminateConfig, base_dir: Path) -> dict[str, list[str]]:
    specs = resolve_tasks(cfg.tasks, [base_dir / f for f in cfg.task_files])
    data_dir = base_dir / cfg.data_dir if cfg.data_dir else None
    texts: dict[str, list[str]] = {}
    for spec in specs:
        items = []
        for doc in load_docs(spec, data_dir):
            if spec.partial:
                items.append(spec.choices(doc)[spec.text(doc)] + " " + str(spec.target(doc)))
            elif spec.output_type == "multiple_choice":
                items.append(str(spec.text(doc)) + " " + spec.choices(doc)[spec.target(doc)])
            else:
                items.append(str(spec.text(doc)) + " " + str(spec.target(doc)))
        texts[spec.name] = items
    for file in cfg.files:
        texts[file] = [d["text"] for d in read_source(SourceConfig(path=file), base_dir)]
    return texts


class Decontaminate:
    """A step that removes documents overlapping any evaluation set (the reason names the set)."""

    def __init__(self, cfg: DecontaminateConfig, base_dir: Path) -> None:
        self.n = cfg.ngram
        self.index: dict[bytes, str] = {}
        for name, items in _task_texts(cfg, base_dir).items():
            for text in items:
                for gram in ngrams(text, self.n):
                    self.index.setdefault(gram, name)

    def __call__(self, doc: Document) -> Result:
        for gram in ngrams(doc["text"], self.n):
            if gram in self.index:
                return Removed(f"overlaps {self.index[gram]}")
        return doc
