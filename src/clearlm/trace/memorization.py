"""What a release reproduces of its training data: k-extractable memorization (Carlini et al., "Quantifying
Memorization Across Neural Language Models": a training document's first 32 tokens as the prompt, memorized when the
greedy next 32 tokens are the document's), the share of the release's sample generations' 32-token spans found
verbatim in the training data (with the trace index), personal-data patterns in the generations (the data stage's
e-mail, phone and IP patterns), and the contamination audit (`contamination.py`). Information for the card,
`openness.json` and the report, not a class criterion."""

from __future__ import annotations

from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from clearlm.data.pii import PATTERNS
from clearlm.stages import spec
from clearlm.trace import contamination
from clearlm.trace.index import corpus_documents

PREFIX = SUFFIX = 32  # tokens: the paper's k = 32 and its 32-token continuation
DOCUMENTS = 100  # training documents sampled per training stage
PRETRAINING = spec("shards").indexed_as  # the base corpus: its documents are named by their source alone
UNSAMPLED = (spec("rlvr").indexed_as,)  # stages whose sequences are context only: no loss on their tokens


def sample_documents(folder: Path, stem: str, dtype: str, n: int, seed: int, stage: str = PRETRAINING
                     ) -> list[tuple[list[int], str, str]]:  # fmt: skip
    """Up to `n` of the documents in `folder`'s `stem`.bin (a corpus's training split, a post-training stage's
    trained sequences) long enough for a prefix and a continuation, drawn with `seed`: (tokens, id, source; a
    source of a stage after pretraining is named with its stage). DPO's rejected answers, which training pushes
    down, are not drawn."""
    long = [(ids, meta) for ids, meta in corpus_documents(folder, stem, dtype, stage)
            if len(ids) >= PREFIX + SUFFIX and meta.get("part") != "rejected"]  # fmt: skip
    chosen = np.random.default_rng(seed).permutation(len(long))[:n]
    return [(ids[: PREFIX + SUFFIX].tolist(), meta["id"],
             meta["source"] if stage == PRETRAINING else f"{meta['source']} ({stage})")
            for ids, meta in (long[i] for i in sorted(chosen))]  # fmt: skip


def extractable(model: Any, documents: list[tuple[list[int], str, str]]) -> dict[str, Any]:
    """The share of documents whose greedy continuation of their first PREFIX tokens is their next SUFFIX tokens,
    in all and per source, and the ids of those reproduced."""
    from clearlm.model.generate import generate

    done = generate(model, [ids[:PREFIX] for ids, _, _ in documents], max_new_tokens=SUFFIX, batch_size=16)
    per: dict[str, Counter[str]] = {}
    found = []
    for (ids, doc_id, source), completion in zip(documents, done, strict=True):
        hit = completion.tokens == ids[PREFIX:]
        per.setdefault(source, Counter()).update(documents=1, extracted=int(hit))
        if hit:
            found.append(doc_id)
    total = sum(c["extracted"] for c in per.values())
    return {"documents": len(documents), "extracted": total, "rate": total / len(documents) if documents else None,
            "per_source": {s: {**c, "rate": c["extracted"] / c["documents"]} for s, c in sorted(per.items())},
            "extracted_ids": found, "prefix_tokens": PREFIX, "suffix_tokens": SUFFIX}  # fmt: skip


def verbatim_spans(index: Any, token_lists: list[list[int]], n: int = SUFFIX) -> dict[str, Any]:
    """How many of the texts' n-token windows occur verbatim in the trace index: those where the longest match
    starting there is n tokens or more (one search of each text, as the contamination audit)."""
    from clearlm.trace.query import longest_matches

    windows = found = 0
    for ids in token_lists:
        starts = max(0, len(ids) - n + 1)
        windows += starts
        found += sum(reach >= n for reach in longest_matches(index.search, ids)[:starts])
    return {"windows": windows, "found": found, "share": found / windows if windows else None, "tokens": n}


def traced(index: Any, tok: Any, texts: list[str]) -> list[list[dict[str, Any]]]:
    """Each text's OLMoTrace spans as character ranges, with their counts and documents (for the report)."""
    from clearlm.trace.query import trace, word_starts

    bow, out = set(word_starts(tok)), []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append([{"start": len(tok.decode(ids[: s.start])), "end": len(tok.decode(ids[: s.end])), "count": s.count,
                     "documents": [{k: getattr(d, k) for k in ("id", "source", "license", "stage", "snippet")}
                                   for d in s.documents]}
                    for s in trace(index, tok, ids, bow=bow)])  # fmt: skip
    return out


def personal_data(texts: list[str]) -> dict[str, int]:
    """Matches of the data stage's personal-data patterns in the texts, by kind."""
    return {kind: sum(len(pattern.findall(t)) for t in texts) for kind, (pattern, _) in PATTERNS.items()}


def card_lines(m: dict[str, Any]) -> list[str]:
    ext = m["extractable"]
    lines = ["## Memorization and leakage", ""]
    if covered := m.get("trace_index"):
        held = ", ".join(f"{stage} {c['documents']:,} documents ({c['tokens']:,} tokens)"
                         for stage, c in covered.items())  # fmt: skip
        outside = "" if "pretraining" in covered else "; not the base model's own training data"
        lines.append(f"- The trace index (`trace/`; `clearlm trace RELEASE TEXT` finds a text's spans in it) holds "
                     f"what this model was trained on: {held}{outside}.")  # fmt: skip
    if not ext:
        lines.append(f"- k-extractable memorization: not measured (no training document of {PREFIX + SUFFIX} tokens "
                     "or more in this run, or a context shorter than that).")  # fmt: skip
    else:
        per = ", ".join(f"{s} {c['extracted']}/{c['documents']}" for s, c in ext["per_source"].items())
        post = any(s.endswith(("(SFT)", "(DPO)")) for s in ext["per_source"])
        lines.append(f"- k-extractable memorization (Carlini et al., k = {ext['prefix_tokens']}): "
                     f"{ext['extracted']} of {ext['documents']} sampled training documents continue greedily into "
                     f"their next {ext['suffix_tokens']} tokens ({per}"
                     + ("; a post-training document is an SFT example or a DPO prompt with its chosen answer, as "
                        "trained on" if post else "") + ").")  # fmt: skip
    spans = m.get("generation_spans")
    if spans and spans["windows"]:
        lines.append(f"- Sample generations: {spans['found']} of their {spans['windows']} {spans['tokens']}-token "
                     "spans occur verbatim in the training data (`clearlm trace RELEASE --generations` shows "
                     "where).")  # fmt: skip
    pii = m["personal_data_in_generations"]
    lines.append("- Personal-data patterns in the sample generations: "
                 + ", ".join(f"{k} {v}" for k, v in pii.items()) + ".")  # fmt: skip
    return [*lines, *contamination.card_lines(m.get("contamination") or {}), ""]


def report_section(m: dict[str, Any]) -> list[str]:
    rows = "".join(f"<tr><td>{escape(s)}</td><td>{c['extracted']}</td><td>{c['documents']}</td></tr>"
                   for s, c in (m["extractable"] or {"per_source": {}})["per_source"].items())  # fmt: skip
    items = "".join(f"<li>{escape(line[2:])}</li>" for line in card_lines(m) if line.startswith("- "))
    table = f"<table><tr><th>source</th><th>extracted</th><th>sampled</th></tr>{rows}</table>"
    return ["<h2>Memorization and leakage</h2>", table, f"<ul>{items}</ul>",
            contamination.report_rows(m.get("contamination") or {})]  # fmt: skip
