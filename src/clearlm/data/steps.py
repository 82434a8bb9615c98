"""Cleaning steps: each takes a document and returns it (possibly rewritten) or a removal reason.

The Gopher and C4 rules are datatrove's (`GopherQualityFilter`, `GopherRepetitionFilter`,
`C4QualityFilter`), line for line, with the same English word and sentence splitting, so a corpus
keeps and drops exactly the same documents in both tools (tests check this against datatrove).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clearlm.data.documents import Document

if TYPE_CHECKING:
    from clearlm.data.dedup import DedupStep
from clearlm.data.text import english
from clearlm.recipe import C4QualityConfig, GopherQualityConfig, GopherRepetitionConfig, NormalizeConfig, StepConfig

# datatrove.utils.text.PUNCTUATION: ASCII/CJK punctuation plus the C0/C1 control characters.
_PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)))
)
PUNCTUATION_SET = set(_PUNCTUATION)


@dataclass(frozen=True)
class Removed:
    reason: str


@dataclass(frozen=True)
class Counted:
    """A kept document with what the step found in it (masks per kind), for the data card."""

    doc: Document
    counts: dict[str, int]


Result = Document | Removed | Counted
Step = Callable[[Document], Result]


def normalize(cfg: NormalizeConfig) -> Step:
    def step(doc: Document) -> Result:
        text = unicodedata.normalize(cfg.form, doc["text"]).replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        return {**doc, "text": text} if text.strip() else Removed("empty")

    return step


def gopher_quality(cfg: GopherQualityConfig) -> Step:
    splitter = english()
    stop_words = set(cfg.stop_words)

    def step(doc: Document) -> Result:
        text = doc["text"]
        words = splitter.words(text)
        n_words = len(words)
        non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
        if cfg.min_doc_words and len(non_symbol) < cfg.min_doc_words:
            return Removed("gopher_short_doc")
        if cfg.max_doc_words and len(non_symbol) > cfg.max_doc_words:
            return Removed("gopher_long_doc")
        avg = sum(len(w) for w in non_symbol) / len(non_symbol) if non_symbol else float("nan")
        if cfg.min_avg_word_length and avg < cfg.min_avg_word_length:
            return Removed("gopher_below_avg_threshold")
        if cfg.max_avg_word_length and avg > cfg.max_avg_word_length:
            return Removed("gopher_above_avg_threshold")
        if cfg.max_symbol_word_ratio and text.count("#") / n_words > cfg.max_symbol_word_ratio:
            return Removed("gopher_too_many_hashes")
        ellipses = text.count("...") + text.count("…")
        if cfg.max_symbol_word_ratio and ellipses / n_words > cfg.max_symbol_word_ratio:
            return Removed("gopher_too_many_ellipsis")
        lines = text.splitlines()
        bullets = sum(s.lstrip().startswith("•") or s.lstrip().startswith("-") for s in lines)
        if cfg.max_bullet_lines_ratio and bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return Removed("gopher_too_many_bullets")
        end_ellipsis = sum(s.rstrip().endswith("...") or s.rstrip().endswith("…") for s in lines)
        if cfg.max_ellipsis_lines_ratio and end_ellipsis / len(lines) > cfg.max_ellipsis_lines_ratio:
            return Removed("gopher_too_many_end_ellipsis")
        alpha_words = sum(any(c.isalpha() for c in w) for w in words)
        if cfg.max_non_alpha_words_ratio and alpha_words / n_words < cfg.max_non_alpha_words_ratio:
            return Removed("gopher_below_alpha_threshold")
        if cfg.min_stop_words and len(stop_words.intersection(words)) < cfg.min_stop_words:
            return Removed("gopher_enough_stop_words")
        return doc

    return step


def _duplicates(items: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _repeated_chars(words: tuple[str, ...], n: int) -> int:
    """Characters in n-grams (joined without spaces) seen before, skipping over each repeat."""
    seen: set[str] = set()
    chars = idx = 0
    while idx < len(words) - n + 1:
        gram = "".join(words[idx : idx + n])
        if gram in seen:
            chars += len(gram)
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return chars


def gopher_repetition(cfg: GopherRepetitionConfig) -> Step:
    splitter = english()
    paragraph_re, line_re = re.compile(r"\n{2,}"), re.compile("\n+")

    def step(doc: Document) -> Result:
        text = doc["text"]
        if not text:
            return Removed("empty")
        paragraphs = paragraph_re.split(text.strip())
        dups, chars = _duplicates(paragraphs)
        if cfg.dup_para_frac and dups / len(paragraphs) > cfg.dup_para_frac:
            return Removed("dup_para_frac")
        if cfg.dup_para_char_frac and chars / len(text) > cfg.dup_para_char_frac:
            return Removed("dup_para_char_frac")
        lines = line_re.split(text)
        dups, chars = _duplicates(lines)
        if cfg.dup_line_frac and dups / len(lines) > cfg.dup_line_frac:
            return Removed("dup_line_frac")
        if cfg.dup_line_char_frac and chars / len(text) > cfg.dup_line_char_frac:
            return Removed("dup_line_char_frac")
        words = splitter.words(text)
        for n, frac in cfg.top_n_grams:
            grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
            if not grams:
                continue
            top, count = Counter(grams).most_common(1)[0]
            if len(top) * count / len(text) > frac:
                return Removed(f"top_{n}_gram")
        for n, frac in cfg.dup_n_grams:
            if _repeated_chars(words, n) / len(text) > frac:
                return Removed(f"duplicated_{n}_n_grams")
        return doc

    return step


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def c4_quality(cfg: C4QualityConfig) -> Step:
    splitter = english()

    def step(doc: Document) -> Result:
        sentences, kept = 0, []
        for raw in doc["text"].splitlines():
            line = raw.strip()
            words = line.split()
            if cfg.max_word_length != -1 and any(len(w) > cfg.max_word_length for w in words):
                continue
            if cfg.remove_citations:
                line = _CITATION.sub("", line)
            if cfg.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < cfg.min_words_per_line:
                continue
            lower = line.lower()
            if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
                return Removed("lorem_ipsum")
            if cfg.filter_javascript and "javascript" in lower:
                continue
            if cfg.filter_curly_bracket and "{" in line:
                return Removed("curly_bracket")
            if cfg.filter_policy and any(p in lower for p in _POLICY):
                continue
            if cfg.min_num_sentences != -1:
                sentences += splitter.sentence_count(line)
            kept.append(line)
        if sentences < cfg.min_num_sentences:
            return Removed("too_few_sentences")
        return {**doc, "text": "\n".join(kept).strip()}

    return step


# Every cleaning step, by its recipe `type`: "module:callable" (imported when a recipe uses it, so a step's
# dependency is needed only then) and whether it reads files relative to the recipe.
STEPS: dict[str, tuple[str, bool]] = {
    "normalize": ("clearlm.data.steps:normalize", False),
    "gopher_quality": ("clearlm.data.steps:gopher_quality", False),
    "gopher_repetition": ("clearlm.data.steps:gopher_repetition", False),
    "c4_quality": ("clearlm.data.steps:c4_quality", False),
    "exact_dedup": ("clearlm.data.dedup:ExactDedup", False),
    "minhash_dedup": ("clearlm.data.dedup:MinHashDedup", False),
    "language": ("clearlm.data.language:IdentifyLanguage", False),
    "pii": ("clearlm.data.pii:MaskPII", False),
    "decontaminate": ("clearlm.data.decontaminate:Decontaminate", True),
}


def build_steps(configs: list[StepConfig], base_dir: Path = Path(".")) -> list[tuple[str, Step | DedupStep]]:
    """(name, step) pairs in recipe order; dependencies are checked here, before any document is read."""
    steps: list[tuple[str, Step | DedupStep]] = []
    for cfg in configs:
        path, reads_files = STEPS[cfg.type]
        module, _, name = path.partition(":")
        make = getattr(importlib.import_module(module), name)
        steps.append((cfg.type, make(cfg, base_dir) if reads_files else make(cfg)))
    return steps
