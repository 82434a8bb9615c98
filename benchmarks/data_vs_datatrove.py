"""Cleaning throughput and decisions: clearlm's Gopher/C4 steps against datatrove's filters.

The same documents (the built-in stdlib corpus and the text sets in ../shared/data) go through
GopherQuality -> GopherRepetition -> C4Quality in each tool, one process each, in the same run;
prints MB/s, the ratio and how many keep/drop decisions (and C4-rewritten texts) differ.

    python benchmarks/data_vs_datatrove.py --data-dir ../shared/data --max-mb 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

from clearlm.data.builtin import stdlib_documents
from clearlm.data.steps import Removed, build_steps
from clearlm.recipe import DataConfig

STEPS = ("gopher_quality", "gopher_repetition", "c4_quality")


def corpus(data_dir: Path, max_bytes: int) -> list[str]:
    texts = [d["text"] for d in stdlib_documents()]
    for name in ("tinystories_sample/tinystories_train_head.txt", "wikitext2_raw_test/wiki.test.raw.nonempty.txt"):
        lines = (data_dir / name).read_text(encoding="utf-8").splitlines()
        texts += ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    for book in sorted((data_dir / "gutenberg_nltk").glob("*.txt")):
        text = book.read_text(encoding="utf-8", errors="replace")
        texts += [text[i : i + 5000] for i in range(0, len(text), 5000)]
    out, total = [], 0
    for i in range(len(texts)):  # interleave kinds so any prefix is a mix
        text = texts[(i * 7919) % len(texts)]
        out.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return out


def run_datatrove(texts: list[str]) -> list[object]:
    filters = [GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter()]
    results = []
    for i, text in enumerate(texts):
        doc, verdict = Document(text=text, id=str(i)), None
        for f in filters:
            out = f.filter(doc)
            if out is not True:
                verdict = ("removed", out[1] if isinstance(out, tuple) else None)
                break
        results.append(verdict or ("kept", doc.text))
    return results


def run_clearlm(texts: list[str]) -> list[object]:
    steps = build_steps(DataConfig(builtin="cpython-stdlib", steps=[{"type": s} for s in STEPS]).steps)
    results = []
    for i, text in enumerate(texts):
        doc, verdict = {"id": str(i), "text": text, "source": "", "metadata": {}}, None
        for _, step in steps:
            doc = step(doc)
            if isinstance(doc, Removed):
                verdict = ("removed", doc.reason)
                break
        results.append(verdict or ("kept", doc["text"]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--max-mb", type=float, default=4.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    texts = corpus(args.data_dir, int(args.max_mb * 1e6))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    timings, outputs = {}, {}
    for name, fn in (("datatrove", run_datatrove), ("clearlm", run_clearlm)):
        fn(texts[:20])  # warm-up: spaCy pipeline construction
        started = time.perf_counter()
        outputs[name] = fn(texts)
        timings[name] = time.perf_counter() - started
    differ = sum(a != b for a, b in zip(outputs["datatrove"], outputs["clearlm"], strict=True))
    kept = sum(r[0] == "kept" for r in outputs["clearlm"])
    print(f"{len(texts)} documents, {mb:.1f} MB; kept {kept}, removed {len(texts) - kept}")
    for name, seconds in timings.items():
        print(f"{name:<10} {seconds:7.1f} s  {mb / seconds:6.2f} MB/s")
    print(f"ratio clearlm/datatrove: {timings['datatrove'] / timings['clearlm']:.2f}x; differing decisions: {differ}")
    if args.json:
        Path(args.json).write_text(json.dumps({"documents": len(texts), "mb": mb, "seconds": timings,
                                               "differing": differ, "kept": kept}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
