"""OLMoTrace's search over a release's trace index: the long, rare verbatim spans of a text that occur in the
training data, each with the documents that hold it.

As OLMoTrace runs it (Ai2's olmo-api and infini-gram-api), with the rules of infini-gram's `attribute` applied here
to the engine's longest matches (see `maximal_spans` for why): for every position that starts a word, the longest
span that occurs in the index, cut after a delimiter (a newline or period token) and ended before a token that starts
a word, keeping only spans not inside an earlier one; spans are ranked by the sum
of their tokens' unigram log-probabilities in the index (rarest first) and the first ceil(0.05 x L) kept (L: the
text's tokens); each keeps up to 10 of its documents, drawn with seed 42 when it has more. `min_tokens` (OLMoTrace:
1) drops shorter spans. A word-starting token, for a byte-level BPE, is one whose text starts with a character that
is not a letter or digit (a space, newline or punctuation), or a special token.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from clearlm.errors import InputError

SPAN_DENSITY = 0.05  # OLMoTrace's `maximum_span_density`
DOCUMENTS_PER_SPAN = 10  # its `maximum_documents_per_span`
SNIPPET_TOKENS = 40  # its `maximum_context_length_snippet`: tokens shown on each side of a match
MAX_COUNT = 1_000_000  # its `maximum_frequency`


@dataclass
class Document:
    index: int  # the document's number in the index
    stage: str
    id: str
    source: str
    license: str
    snippet: str  # the match with up to SNIPPET_TOKENS tokens on each side, the match between [[ and ]]


@dataclass
class Span:
    start: int  # token positions in the traced text, [start, end)
    end: int
    text: str
    count: int  # occurrences in the training data
    unigram_logprob: float  # the sum of its tokens' log-probabilities in the index (lower: rarer)
    documents: list[Document] = field(default_factory=list)


@dataclass
class TraceIndex:
    """infini-gram's engine over an index, and how often each token id occurs in it (for the unigram probabilities,
    counted once from the token file rather than by a search per token)."""

    search: Any
    counts: np.ndarray  # by token id, the separator left out
    total: int  # token positions, the documents' separators included (infini-gram's denominator)


def open_index(folder: Path) -> TraceIndex:
    """The index in `folder` (as `index.write_index` and the trace stage write it); one-line errors when it or
    infini-gram is missing."""
    if not (folder / "index.json").is_file():
        raise InputError(f"{folder}: no trace index here (set release.trace_index = true and rebuild the release)")
    try:
        from infini_gram.engine import InfiniGramEngine
    except ImportError:
        raise InputError("tracing needs infini-gram's engine: pip install infini-gram (it ships wheels for CPython "
                         "3.11 on Linux only)") from None  # fmt: skip
    info = json.loads((folder / "index.json").read_text())
    dtype = np.dtype(info["token_dtype"])
    search = InfiniGramEngine(index_dir=str(folder), eos_token_id=info["eos_id"], vocab_size=np.iinfo(dtype).max,
                              token_dtype="u16" if dtype == np.uint16 else "u32")  # fmt: skip
    tokens = np.fromfile(folder / "tokenized.0", dtype=dtype)
    return TraceIndex(search, np.bincount(tokens[tokens != np.iinfo(dtype).max]), len(tokens))


def word_starts(tok: Tokenizer) -> list[int]:
    """Token ids that start a word: special tokens, and tokens whose text starts with a non-alphanumeric character."""
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = []
    for token, i in tok.get_vocab().items():
        text = tok.decode([i])
        if token in special or not text or not text[0].isalnum():
            out.append(i)
    return sorted(out)


def delimiters(tok: Tokenizer) -> list[int]:
    """OLMoTrace's delimiters, a newline and a period, as the tokenizer's single tokens for them."""
    out = []
    for text in ("\n", "."):
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) == 1:
            out += ids
    return out


def _longest(search: Any, ids: list[int], at_least: int) -> int:
    """The length of the longest prefix of `ids` that occurs in the index, knowing that `at_least` tokens do: a
    galloping search from there (matches are mostly short), then a binary one."""

    def occurs(n: int) -> bool:
        return bool(search.find(input_ids=ids[:n]).get("cnt"))  # an id the index cannot hold occurs nowhere

    lo, hi, step = at_least, len(ids), 1
    while lo + step <= hi:
        if not occurs(lo + step):
            hi = lo + step - 1
            break
        lo, step = lo + step, step * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if occurs(mid) else (lo, mid - 1)
    return lo


def longest_matches(search: Any, ids: list[int], where: list[int] | None = None) -> list[int]:
    """The length of the longest span of `ids` starting at each position that occurs in the index (exact at the
    positions `where`, default all).

    From the engine's `creativity` (one call, a thread a position), whose search, like `attribute`'s, in infini-gram
    2.6.0 reports 0 for a text that sorts before every suffix of the index (it reads rank `start - 1` with `start` 0
    as an unsigned number, so inspects nothing): a 0 at a token that does occur is searched again here, by a
    galloping search on `find`."""
    reach = [r - i for i, r in enumerate(search.creativity(input_ids=ids)["rs"])] if ids else []
    for i in range(len(ids)) if where is None else where:
        if reach[i] == 0 and search.count(input_ids=ids[i : i + 1]).get("count"):
            reach[i] = _longest(search, ids[i:], 1)
    return reach


def maximal_spans(search: Any, ids: list[int], delims: set[int], bow: set[int], min_tokens: int = 1,
                  max_count: int | None = MAX_COUNT) -> list[tuple[int, int]]:  # fmt: skip
    """infini-gram's `attribute` rules: from every word-starting position, the longest span that occurs, cut after
    its first delimiter and backed off to end before a word start; spans of `min_tokens` or more occurring at most
    `max_count` times (None: the index is too small for any to occur more); then those that end after every earlier
    one.

    See `longest_matches` for why not `attribute` itself."""
    reach = longest_matches(search, ids, [i for i, t in enumerate(ids) if t in bow])
    out, last_r = [], 0
    for left in range(len(ids)):
        if ids[left] not in bow:
            continue
        n = reach[left]
        n = next((pos + 1 for pos in range(n - 1) if ids[left + pos] in delims), n)
        while n > 0 and not (left + n == len(ids) or ids[left + n] in bow):
            n -= 1
        if n < min_tokens or left + n <= last_r:  # too short, or inside the span kept before it
            continue
        if max_count is None or search.count(input_ids=ids[left : left + n]).get("count", 0) <= max_count:
            out.append((left, left + n))
            last_r = left + n
    return out


def trace(index: TraceIndex, tok: Tokenizer, ids: list[int], *, min_tokens: int = 1, density: float = SPAN_DENSITY,
          documents: int = DOCUMENTS_PER_SPAN, bow: set[int] | None = None) -> list[Span]:  # fmt: skip
    """The kept spans of `ids`, in text order, each with up to `documents` of its documents. `bow`: the tokenizer's
    `word_starts`, when already worked out (it decodes the whole vocabulary)."""
    bow = set(word_starts(tok)) if bow is None else bow
    search, total = index.search, index.total
    spans = maximal_spans(search, ids, set(delimiters(tok)), bow, min_tokens,
                          MAX_COUNT if total > MAX_COUNT else None)  # fmt: skip

    def logprob(t: int) -> float:  # as infini-gram's engine scores a span's tokens
        count = int(index.counts[t]) if t < len(index.counts) else 0
        return math.log(count) - math.log(total) if count else -10000.0

    scored = [(sum(logprob(t) for t in ids[left:right]), left, right) for left, right in spans]
    kept = sorted(scored, key=lambda x: x[0])[: math.ceil(len(ids) * density)]
    out = []
    for score, left, right in sorted(kept, key=lambda x: x[1]):
        found = search.find(input_ids=ids[left:right])
        span = Span(left, right, tok.decode(ids[left:right]), found["cnt"], score)
        for s, rank in _occurrences(found["segment_by_shard"], documents):
            doc = search.get_doc_by_rank_2(s=s, rank=rank, needle_len=right - left, max_ctx_len=SNIPPET_TOKENS)
            meta = json.loads(doc["metadata"]) if doc["metadata"] else {}
            window, at = doc["token_ids"], doc["needle_offset"]
            snippet = (tok.decode(window[:at]) + "[[" + tok.decode(window[at : at + right - left]) + "]]"
                       + tok.decode(window[at + right - left :]))  # fmt: skip
            span.documents.append(Document(doc["doc_ix"], meta.get("stage", ""), meta.get("id", ""),
                                           meta.get("source", ""), meta.get("license", ""), snippet))  # fmt: skip
        out.append(span)
    return out


def _occurrences(segments: list[tuple[int, int]], documents: int) -> list[tuple[int, int]]:
    """(shard, rank) of every occurrence `find` returned, in order, or `documents` of them drawn with seed 42 when
    there are more, without listing the others (a common span occurs up to MAX_COUNT times)."""
    sizes = [hi - lo for lo, hi in segments]
    every = range(sum(sizes))
    picks = every if len(every) <= documents else sorted(random.Random(42).sample(every, documents))
    out, starts = [], np.cumsum([0, *sizes])
    for k in picks:
        s = int(np.searchsorted(starts, k, side="right")) - 1
        out.append((s, segments[s][0] + k - int(starts[s])))
    return out


def as_json(spans: list[Span]) -> list[dict[str, Any]]:
    return [asdict(s) for s in spans]
