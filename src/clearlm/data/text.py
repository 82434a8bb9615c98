"""Word and sentence splitting for the quality filters, exactly as datatrove splits English.

datatrove tokenises English with spaCy's rule-based `blank("en")` tokenizer plus its sentencizer;
using the same library (not a look-alike regex) is what makes the keep/drop decisions identical.
spaCy is needed only when a recipe uses a filter that counts words or sentences.
"""

from __future__ import annotations

import functools
from typing import Any

from clearlm.errors import RecipeError


class EnglishSplitter:
    def __init__(self) -> None:
        try:
            import spacy
        except ImportError:
            raise RecipeError("the Gopher and C4 filters need spaCy: pip install spacy") from None
        self._nlp: Any = spacy.blank("en")
        self._nlp.add_pipe("sentencizer")

    def _doc(self, text: str) -> Any:
        self._nlp.max_length = len(text) + 10
        return self._nlp(text, disable=["parser", "tagger", "ner"])

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one splitter per run; filters share the last texts
    def words(self, text: str) -> tuple[str, ...]:
        """Tokens with surrounding whitespace stripped, empty ones dropped."""
        with self._nlp.memory_zone():
            tokens = [t.text.strip() for t in self._doc(text)]
        return tuple(t for t in tokens if t)

    def sentence_count(self, text: str) -> int:
        """Number of sentences as datatrove's split_into_sentences returns them (at least one)."""
        with self._nlp.memory_zone():
            return max(1, sum(1 for _ in self._doc(text).sents))


@functools.cache
def english() -> EnglishSplitter:
    return EnglishSplitter()
