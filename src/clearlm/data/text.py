"""Word and sentence splitting for the quality filters, exactly as datatrove splits English.

datatrove tokenises English with spaCy's rule-based `blank("en")` tokenizer plus its sentencizer;
using the same library (not a look-alike regex) is what makes the keep/drop decisions identical.
spaCy is needed only when a recipe uses a filter that counts words or sentences.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from itertools import accumulate
from typing import Any

from clearlm.errors import RecipeError


class EnglishSplitter:
    """spaCy's English tokenizer, with a cache of how it splits each whitespace-free piece of text.

    spaCy splits text at whitespace first and then splits each piece on its own (prefixes, suffixes,
    infixes, exceptions), so a text's tokens are its pieces' tokens in order. Pieces repeat (Zipf),
    so each distinct piece goes through spaCy once, and the new pieces of a text go through in one
    call. Results are spaCy's exactly; the cache and spaCy's vocabulary (which keeps every string it
    has seen) are reset past `max_entries` to bound memory. Of the lexical attributes spaCy computes
    for each new string, only `is_punct` is kept: it is the one the sentencizer uses, and the others
    (shape, like_num, like_url, ...) cost more than the splitting itself.
    """

    def __init__(self, max_entries: int = 500_000) -> None:
        try:
            import spacy
            from spacy.attrs import IS_PUNCT
        except ImportError:
            raise RecipeError("the Gopher and C4 filters need spaCy: pip install spacy") from None
        self._spacy, self._punct, self.max_entries = spacy, IS_PUNCT, max_entries
        self._nlp: Any = None
        self._pieces: dict[str, tuple[str, ...]] = {}

    def _pipeline(self) -> Any:
        if self._nlp is None or len(self._nlp.vocab) > self.max_entries or len(self._pieces) > self.max_entries:
            self._nlp = self._spacy.blank("en")
            self._nlp.add_pipe("sentencizer")
            getters = self._nlp.vocab.lex_attr_getters  # computed for every new string: keep what the
            self._nlp.vocab.lex_attr_getters = {self._punct: getters[self._punct]}  # sentencizer reads
            self._pieces = {}
        return self._nlp

    def _doc(self, text: str) -> Any:
        nlp = self._pipeline()
        nlp.max_length = len(text) + 10
        return nlp(text, disable=["parser", "tagger", "ner"])

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one splitter per run; filters share the last texts
    def words(self, text: str) -> tuple[str, ...]:
        """Tokens with surrounding whitespace stripped, empty ones dropped (datatrove's word_tokenize)."""
        pieces = text.split()
        tokenizer = self._pipeline().tokenizer
        new = [p for p in dict.fromkeys(pieces) if p not in self._pieces]
        if new:
            starts = list(accumulate((len(p) + 1 for p in new[:-1]), initial=0))
            split: list[list[str]] = [[] for _ in new]
            for token in tokenizer(" ".join(new)):
                split[bisect_right(starts, token.idx) - 1].append(token.text)
            self._pieces.update(zip(new, map(tuple, split), strict=True))
        return tuple(token for piece in pieces for token in self._pieces[piece])

    def sentence_count(self, text: str) -> int:
        """Number of sentences as datatrove's split_into_sentences returns them (at least one)."""
        return max(1, sum(1 for _ in self._doc(text).sents))


@functools.cache
def english() -> EnglishSplitter:
    return EnglishSplitter()
