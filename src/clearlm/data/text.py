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
    """spaCy's English tokenizer. Its vocabulary keeps every string it has seen, which is what makes it
    fast (a known word is a lookup); to bound memory, the pipeline is rebuilt once the vocabulary passes
    `max_vocab` entries. Results do not depend on the vocabulary's state.

    Of the lexical attributes spaCy computes for each new string, only `is_punct` is kept: it is the one
    the sentencizer reads, and the others (shape, like_num, like_url, ...) cost more than the splitting.
    (Caching the split per whitespace-free piece was tried and dropped: spaCy's special cases can match
    across a single space, so pieces are not independent.)
    """

    def __init__(self, max_vocab: int = 500_000) -> None:
        try:
            import spacy
            from spacy.attrs import IS_PUNCT
        except ImportError:
            raise RecipeError("the Gopher and C4 filters need spaCy: pip install spacy") from None
        self._spacy, self._punct, self.max_vocab = spacy, IS_PUNCT, max_vocab
        self._nlp: Any = None

    def _doc(self, text: str) -> Any:
        if self._nlp is None or len(self._nlp.vocab) > self.max_vocab:
            self._nlp = self._spacy.blank("en")
            self._nlp.add_pipe("sentencizer")
            getters = self._nlp.vocab.lex_attr_getters
            self._nlp.vocab.lex_attr_getters = {self._punct: getters[self._punct]}
        self._nlp.max_length = len(text) + 10
        return self._nlp(text, disable=["parser", "tagger", "ner"])

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one splitter per run; filters share the last texts
    def words(self, text: str) -> tuple[str, ...]:
        """Tokens with surrounding whitespace stripped, empty ones dropped (datatrove's word_tokenize)."""
        return tuple(t for t in (tok.text.strip() for tok in self._doc(text)) if t)

    def sentence_count(self, text: str) -> int:
        """Number of sentences as datatrove's split_into_sentences returns them (at least one)."""
        return max(1, sum(1 for _ in self._doc(text).sents))


@functools.cache
def english() -> EnglishSplitter:
    return EnglishSplitter()
