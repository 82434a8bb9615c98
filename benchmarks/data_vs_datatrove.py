"""The data stage against datatrove: the same corpus, filters and MinHash settings, in the same run.

1. Filters alone: GopherQuality -> GopherRepetition -> C4Quality called on each document in one
   process per tool (no I/O); MB/s, ratio, and how many keep/drop decisions or C4 rewrites differ.
2. The whole stage with `--workers` processes each: jsonl files in, the three filters, MinHash
   dedup (FineWeb's 5-grams, 14 x 8), kept documents out. datatrove runs its usual pipelines with
   `LocalPipelineExecutor` (filter, then MinHash signature, buckets, cluster and filter stages);
   clearlm runs `build_corpus`. Prints wall time, MB/s, the ratio, differing filter decisions and
   whether the near-duplicate clusters are the same.
3. clearlm's peak memory (driver and workers, max RSS) on the corpus and on it repeated 8 times.

    python benchmarks/data_vs_datatrove.py --data-dir ../shared/data --max-mb 6 --workers 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from clearlm.data.builtin import stdlib_documents
from clearlm.data.steps import Removed, build_steps
from clearlm.recipe import DataConfig

FILTERS = ("gopher_quality", "gopher_repetition", "c4_quality")


def corpus(data_dir: Path, max_bytes: int) -> list[str]:
    texts = [d["text"] for d in stdlib_documents()]
    for name in ("tinystories_sample/tinystories_train_head.txt", "wikitext2_raw_test/wiki.test.raw.nonempty.txt"):
        lines = (data_dir / name).read_text(encoding="utf-8").splitlines()
        texts += ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    for book in sorted((data_dir / "gutenberg_nltk").glob("*.txt")):
        text = book.read_text(encoding="utf-8", errors="replace")
        texts += [text[i : i + 5000] for i in range(0, len(text), 5000)]
    out, total, rng = [], 0, random.Random(0)
    for i in range(len(texts)):  # interleave kinds so any prefix is a mix
        text = texts[(i * 7919) % len(texts)]
        out.append(text)
        if i % 20 == 19:  # a near-duplicate (2% of the words replaced) of an earlier document, as crawls have
            words = out[rng.randrange(len(out) - 1)].split(" ")
            for j in rng.sample(range(len(words)), len(words) // 50):
                words[j] = "changed"
            out.append(" ".join(words))
        total += sum(len(t.encode()) for t in out[-2:]) if i % 20 == 19 else len(text.encode())
        if total >= max_bytes:
            break
    return out


def filters_datatrove(texts: list[str]) -> list[object]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

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


def filters_clearlm(texts: list[str]) -> list[object]:
    steps = build_steps(DataConfig(builtin="cpython-stdlib", steps=[{"type": s} for s in FILTERS]).steps)
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


def compare_filters(texts: list[str], mb: float) -> dict[str, object]:
    timings, outputs = {}, {}
    for name, fn in (("datatrove", filters_datatrove), ("clearlm", filters_clearlm)):
        fn(texts[:20])  # warm-up: spaCy pipeline construction
        started = time.perf_counter()
        outputs[name] = fn(texts)
        timings[name] = time.perf_counter() - started
    differ = sum(a != b for a, b in zip(outputs["datatrove"], outputs["clearlm"], strict=True))
    kept = sum(r[0] == "kept" for r in outputs["clearlm"])
    print(f"1. filters, one process each: {len(texts)} documents, {mb:.1f} MB; kept {kept}")
    for name, seconds in timings.items():
        print(f"   {name:<10} {seconds:7.1f} s  {mb / seconds:6.2f} MB/s")
    print(f"   ratio {timings['datatrove'] / timings['clearlm']:.2f}x; differing decisions: {differ}")
    return {"seconds": timings, "differing": differ, "kept": kept}


def write_inputs(texts: list[str], folder: Path, files: int) -> None:
    folder.mkdir(parents=True)
    per = -(-len(texts) // files)
    for f in range(files):
        rows = [{"id": f"doc{i}", "text": texts[i]} for i in range(f * per, min(len(texts), (f + 1) * per))]
        (folder / f"{f:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def stage_datatrove(inputs: Path, work: Path, workers: int) -> tuple[set[str], list[list[str]]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    files, config = len(list(inputs.iterdir())), MinhashConfig()
    filtered, sigs, buckets, ids, out = (str(work / n) for n in ("filtered", "sigs", "buckets", "ids", "out"))
    stages = [
        (
            [
                JsonlReader(str(inputs)),
                GopherQualityFilter(),
                GopherRepetitionFilter(),
                C4QualityFilter(),
                JsonlWriter(filtered),
            ],
            files,
        ),
        ([JsonlReader(filtered), MinhashDedupSignature(sigs, config=config)], files),
        ([MinhashDedupBuckets(sigs, buckets, config=config)], config.num_buckets),
        ([MinhashDedupCluster(buckets, ids, config=config, save_cluster_id=True)], 1),
        ([JsonlReader(filtered), MinhashDedupFilter(ids), JsonlWriter(out)], files),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(work / f"log{i}")
        ).run()
    from datatrove.pipeline.readers import JsonlReader as Reader

    by_rank = [[d.id for d in Reader(filtered).read_file(f)] for f in sorted(p.name for p in Path(filtered).iterdir())]
    kept_after_filters = {i for rank in by_rank for i in rank}
    groups: dict[int, list[str]] = defaultdict(list)
    for path in sorted(Path(ids).glob("*.clusters")):
        rank = int(path.name.split(".")[0])
        for doc, cluster in struct.iter_unpack("<II", path.read_bytes()):
            groups[cluster].append(by_rank[rank][doc])
    return kept_after_filters, sorted(sorted(g) for g in groups.values())


def stage_clearlm(inputs: Path, work: Path, workers: int) -> tuple[set[str], list[list[str]]]:
    from clearlm.data.corpus import build_corpus
    from clearlm.data.documents import read_jsonl
    from clearlm.recipe import SourceConfig

    steps = [{"type": s} for s in (*FILTERS, "minhash_dedup")]
    cfg = DataConfig(sources=[SourceConfig(path=str(inputs / "*.jsonl"))], steps=steps, workers=workers,
                     validation_fraction=0.1)  # fmt: skip
    work.mkdir()
    build_corpus(cfg, inputs, work)
    kept = {d["id"] for s in ("train", "validation") for d in read_jsonl(work / f"{s}.jsonl")}
    groups: dict[str, list[str]] = defaultdict(list)
    for r in read_jsonl(work / "removed.jsonl"):
        if r["step"] == "minhash_dedup":
            kept.add(r["id"])
            groups[r["duplicate_of"]].append(r["id"])
    clusters = [sorted([first, *others]) for first, others in groups.items()]
    return kept, sorted(clusters)


def compare_stage(texts: list[str], mb: float, workers: int, tmp: Path) -> dict[str, object]:
    inputs = tmp / "in"
    write_inputs(texts, inputs, files=max(2, workers))
    timings, results = {}, {}
    for name, fn in (("datatrove", stage_datatrove), ("clearlm", stage_clearlm)):
        started = time.perf_counter()
        results[name] = fn(inputs, tmp / name, workers)
        timings[name] = time.perf_counter() - started
    (dt_kept, dt_clusters), (cl_kept, cl_clusters) = results["datatrove"], results["clearlm"]
    differ = len(dt_kept ^ cl_kept)
    print(f"2. whole stage (filters + MinHash), {workers} workers each: {mb:.1f} MB")
    for name, seconds in timings.items():
        print(f"   {name:<10} {seconds:7.1f} s  {mb / seconds:6.2f} MB/s")
    print(f"   ratio {timings['datatrove'] / timings['clearlm']:.2f}x; differing filter decisions: {differ}; "
          f"near-duplicate clusters: datatrove {len(dt_clusters)}, clearlm {len(cl_clusters)}, "
          f"same: {dt_clusters == cl_clusters}")  # fmt: skip
    return {"seconds": timings, "differing": differ, "clusters": {"datatrove": len(dt_clusters),
            "clearlm": len(cl_clusters), "same": dt_clusters == cl_clusters}}  # fmt: skip


_MEASURE = """
import resource, sys
from pathlib import Path
from clearlm.data.corpus import build_corpus
from clearlm.recipe import DataConfig, SourceConfig
steps = [{"type": s} for s in ("gopher_quality", "gopher_repetition", "c4_quality", "minhash_dedup")]
cfg = DataConfig(sources=[SourceConfig(path=sys.argv[1] + "/*.jsonl")], steps=steps, workers=int(sys.argv[3]),
                 validation_fraction=0.1)
build_corpus(cfg, Path(sys.argv[1]), Path(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_memory(texts: list[str], workers: int, tmp: Path) -> dict[str, object]:
    peaks = {}
    for times in (1, 8):
        inputs, out = tmp / f"mem{times}", tmp / f"mem{times}-out"
        write_inputs(texts * times, inputs, files=max(2, workers))
        out.mkdir()
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(inputs), str(out), str(workers)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        driver, worker = (int(x) / 1024 for x in run.stdout.split()[-2:])
        peaks[times] = {"driver_mb": driver, "worker_mb": worker}
    ratio = {k: peaks[8][k] / peaks[1][k] for k in ("driver_mb", "worker_mb") if peaks[1][k]}
    print("3. clearlm peak memory (max RSS), corpus x1 and x8:")
    for times, p in peaks.items():
        print(f"   x{times}: driver {p['driver_mb']:.0f} MB, largest worker {p['worker_mb']:.0f} MB")
    print("   ratio x8/x1: " + ", ".join(f"{k.split('_')[0]} {v:.2f}" for k, v in ratio.items()))
    return {"peaks": peaks, "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--max-mb", type=float, default=4.0)
    ap.add_argument("--memory-mb", type=float, default=1.0, help="corpus size for the x1 / x8 memory runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["filters", "stage", "memory"])
    ap.add_argument("--json")
    args = ap.parse_args()
    texts = corpus(args.data_dir, int(args.max_mb * 1e6))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    report: dict[str, object] = {"documents": len(texts), "mb": mb, "workers": args.workers}
    tmp = Path(tempfile.mkdtemp(prefix="clearlm-bench-"))
    try:
        if "filters" not in args.skip:
            report["filters"] = compare_filters(texts, mb)
        if "stage" not in args.skip:
            report["stage"] = compare_stage(texts, mb, args.workers, tmp)
        if "memory" not in args.skip:
            report["memory"] = peak_memory(corpus(args.data_dir, int(args.memory_mb * 1e6)), args.workers, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
