"""Rolling log-likelihood of whole documents, reported per domain as bits-per-byte (Paloma-style).

Windows are built exactly as lm-evaluation-harness's `loglikelihood_rolling` builds them (disjoint
windows of the model's context, the end-of-text token as the first window's prefix), so every token
is predicted once. The text is scored as given: lm-eval's `wikitext` task additionally detokenises
and splits articles, which this does not.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer

from clearlm.eval.scoring import score_windows
from clearlm.model.auto import CausalLM

Window = tuple[list[int], list[int]]


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[Window]:
    """(input, targets) pairs; the last len(targets) positions of input predict targets."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_id, *tokens[: first - 1]], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    return windows


def domain_bits_per_byte(
    model: CausalLM,
    tok: Tokenizer,
    docs: Iterable[dict[str, Any]],
    prefix_id: int,
    batch_size: int = 8,
    max_docs_per_domain: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per `source`: bits_per_byte, byte_perplexity, word_perplexity, plus an `all` row."""
    model.eval()
    texts: dict[str, list[str]] = defaultdict(list)
    for doc in docs:
        if not doc["text"]:
            continue  # nothing to predict, and no bytes to divide by
        bucket = texts[doc["source"]]
        if max_docs_per_domain is None or len(bucket) < max_docs_per_domain:
            bucket.append(doc["text"])
    totals: dict[str, dict[str, float]] = {}
    for domain, domain_texts in sorted(texts.items()):
        encodings = tok.encode_batch(domain_texts, add_special_tokens=False)
        windows = [w for enc in encodings for w in rolling_windows(enc.ids, prefix_id, model.cfg.context)]
        nll = -sum(score.logprob for score in score_windows(model, windows, batch_size))
        totals[domain] = {
            "nll": nll,
            "bytes": sum(len(t.encode("utf-8")) for t in domain_texts),
            "words": sum(len(re.split(r"\s+", t)) for t in domain_texts),
            "tokens": sum(len(e.ids) for e in encodings),
            "documents": len(domain_texts),
        }
    if totals:
        totals["all"] = {k: sum(t[k] for t in totals.values()) for k in next(iter(totals.values()))}
    return {domain: _metrics(t) for domain, t in totals.items()}


def _metrics(t: dict[str, float]) -> dict[str, float]:
    return {
        "bits_per_byte": t["nll"] / (math.log(2) * t["bytes"]),
        "byte_perplexity": math.exp(t["nll"] / t["bytes"]),
        "word_perplexity": math.exp(t["nll"] / t["words"]),
        "token_perplexity": math.exp(t["nll"] / max(t["tokens"], 1)),
        "documents": int(t["documents"]),
        "bytes": int(t["bytes"]),
        "tokens": int(t["tokens"]),
    }
