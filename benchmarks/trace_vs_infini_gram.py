"""The trace index: clearlm's builder against infini-gram's own indexer, and a 200-token trace, on a release's tokens.

Index build: the release's training documents (its `trace/` index, read back) written by `clearlm.trace.index` and
by infini-gram's indexer (`infini_gram.indexing.build_sa`: its Rust make-part/merge/concat, u16 ids), once as they
are and ten times over (each copy's token ids renamed by its own random permutation of the vocabulary: ten times
the tokens with the corpus's own repetition inside a copy and none across copies; infini-gram's merge step was
still running after 10 minutes on plain copies); whether the two suffix arrays are byte-identical. Query: OLMoTrace's
search of a 200-token text (the release's sample generations, repeated to length) with clearlm (`trace.query.trace`:
its span rules on infini-gram's `find`, ranking, documents) and infini-gram's `attribute` (spans only), median of 20.

    python benchmarks/trace_vs_infini_gram.py runs/quickstart/release
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from clearlm.trace.index import write_index
from clearlm.trace.query import delimiters, open_index, trace, word_starts


def documents(index: Path) -> list[np.ndarray]:
    info = json.loads((index / "index.json").read_text())
    dtype = np.dtype(info["token_dtype"])
    data = np.fromfile(index / "tokenized.0", dtype=dtype)
    starts = np.fromfile(index / "offset.0", dtype=np.uint64).astype(np.int64) // dtype.itemsize
    ends = [*starts[1:].tolist(), len(data)]
    return [data[s + 1 : e] for s, e in zip(starts.tolist(), ends, strict=True)]  # without the separator


def infini_gram_build(folder: Path) -> float:
    from infini_gram import indexing

    args = argparse.Namespace(save_dir=str(folder), temp_dir=str(folder), worker_id=0, shards=1, workers=1, mem=8,
                              cpus=2, token_width=2)  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        indexing.build_sa(args)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release", type=Path)
    args = ap.parse_args()
    docs = documents(args.release / "trace")
    tok = Tokenizer.from_file(str(args.release / "tokenizer.json"))
    work = Path(tempfile.mkdtemp(prefix="trace-bench-"))
    try:
        vocab = tok.get_vocab_size()
        renamed = [np.arange(vocab)] + [np.random.default_rng(k).permutation(vocab) for k in range(1, 10)]
        for copies in (1, 10):
            corpus = [(renamed[i][d].astype(np.uint16), {"id": str(i)}) for i in range(copies) for d in docs]
            ours = work / f"clearlm-{copies}"
            started = time.perf_counter()
            size = write_index(corpus, np.dtype(np.uint16), ours)
            ours_s = time.perf_counter() - started
            theirs = work / f"infini-gram-{copies}"
            theirs.mkdir()
            shutil.copy(ours / "tokenized.0", theirs / "tokenized.0")
            shutil.copy(ours / "offset.0", theirs / "offset.0")
            theirs_s = infini_gram_build(theirs)
            same = (ours / "table.0").read_bytes() == (theirs / "table.0").read_bytes()
            print(f"index of {size['tokens']:,} tokens ({copies}x): clearlm {ours_s:.2f} s, infini-gram's indexer "
                  f"{theirs_s:.2f} s ({theirs_s / ours_s:.2f}x); suffix arrays {'identical' if same else 'DIFFER'}",
                  flush=True)  # fmt: skip
        from infini_gram.engine import InfiniGramEngine

        index = open_index(args.release / "trace")
        (work / "bow.txt").write_text("".join(f"{i}\n" for i in word_starts(tok)))  # attribute reads word starts
        search = InfiniGramEngine(index_dir=str(args.release / "trace"), eos_token_id=0, vocab_size=65535,
                                  bow_ids_path=str(work / "bow.txt"))  # fmt: skip
        completions = [json.loads(line)["completion"] for line in (args.release / "eval" / "generations.jsonl").open()]
        ids = (tok.encode(" ".join(completions)).ids * 10)[:200]
        bow = set(word_starts(tok))
        timings = {"clearlm": [], "attribute": []}
        for _ in range(20):
            started = time.perf_counter()
            spans = trace(index, tok, ids, bow=bow)
            timings["clearlm"].append(time.perf_counter() - started)
            started = time.perf_counter()
            search.attribute(input_ids=ids, delim_ids=delimiters(tok), min_len=1, max_cnt=1_000_000, enforce_bow=True)
            timings["attribute"].append(time.perf_counter() - started)
        ours_ms, theirs_ms = (statistics.median(timings[k]) * 1000 for k in ("clearlm", "attribute"))
        print(f"trace of 200 tokens: clearlm {ours_ms:.1f} ms ({len(spans)} spans kept, with their documents), "
              f"infini-gram attribute {theirs_ms:.1f} ms (spans only)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
