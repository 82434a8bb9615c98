"""The data stage as a run: resuming from finished parts, Ray against local workers, and MinHash
clusters against datatrove's own MinHash pipeline."""

from __future__ import annotations

import json
import random
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from clearlm.data import corpus
from clearlm.data.corpus import build_corpus
from clearlm.data.dedup import MinHashDedup
from clearlm.data.executor import StepWorker
from clearlm.recipe import DataConfig, MinHashDedupConfig, SourceConfig

OUTPUTS = ("train.jsonl", "validation.jsonl", "removed.jsonl", "rejects.jsonl", "data_card.md", "data_card.json")
STEPS = [{"type": "normalize"}, {"type": "gopher_quality"}, {"type": "pii"}, {"type": "exact_dedup"},
         {"type": "minhash_dedup"}]  # fmt: skip


def _corpus(path: Path, n: int = 120) -> None:
    rng = random.Random(1)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "a",
        "dog",
        "barked",
        "at",
        "the",
        "mailman",
        "while",
        "the",
        "sun",
        "shone",
        "over",
        "green",
        "hills",
    ]
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(90)) + f". Write to user{i}@example.org today."
        rows.append({"id": f"d{i}", "text": text})
    rows += [{"id": f"copy{i}", "text": rows[i]["text"].replace(" ", "  ")} for i in range(0, n, 10)]
    rows.append({"id": "short", "text": "too short"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(tmp_path: Path, name: str, **settings) -> tuple[dict[str, bytes], dict]:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    cfg = DataConfig(sources=[SourceConfig(path="c.jsonl")], validation_fraction=0.2, steps=STEPS, **settings)
    metrics = build_corpus(cfg, tmp_path, out)
    return {f: (out / f).read_bytes() for f in OUTPUTS}, metrics


def test_interrupted_run_resumes_from_finished_parts(tmp_path, monkeypatch):
    _corpus(tmp_path / "c.jsonl")
    monkeypatch.setattr(corpus, "PART_DOCUMENTS", 20)
    monkeypatch.setattr(corpus, "CHUNK_DOCUMENTS", 5)
    expected = _run(tmp_path, "straight")

    cleaned: list[int] = []
    clean = StepWorker.clean
    monkeypatch.setattr(StepWorker, "clean", lambda self, docs: cleaned.append(len(docs)) or clean(self, docs))
    written, write_part = [], corpus._write_part

    def interrupt_third(path, header, records):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        write_part(path, header, records)

    monkeypatch.setattr(corpus, "_write_part", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "resumed")
    work = tmp_path / "resumed" / "work"
    assert sorted(p.name for p in work.iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    (work / "part-00002.jsonl.tmp").write_text("half a part")  # a crash mid-write leaves only a .tmp
    (work / "part-00003.jsonl").write_text('{"part": 3, "documents": 20, "first": "d0"}\n')  # not this part

    monkeypatch.setattr(corpus, "_write_part", write_part)
    cleaned.clear()
    assert _run(tmp_path, "resumed") == expected
    assert sum(cleaned) == 133 - 40, "the two finished parts are not cleaned again"
    assert not work.exists(), "the parts are removed once the output is complete"


@pytest.mark.slow
def test_output_does_not_depend_on_workers_or_ray(tmp_path):
    pytest.importorskip("ray")
    _corpus(tmp_path / "c.jsonl")
    local = _run(tmp_path, "local")
    assert local[1]["steps"]["exact_dedup"]["removed"] == 12
    assert local[1]["steps"]["pii"]["counts"] == {"email": local[1]["steps"]["pii"]["documents_in"]}
    assert _run(tmp_path, "processes", workers=2) == local
    assert _run(tmp_path, "ray", workers=2, executor="ray") == local


def test_minhash_signatures_equal_datatrove():
    minhash = pytest.importorskip("datatrove.pipeline.dedup.minhash")
    theirs = minhash.MinhashDedupSignature(output_folder="unused")
    ours = MinHashDedup(MinHashDedupConfig(type="minhash_dedup"))
    texts = [
        "Café déjà vu: 3.14 apples, 2,000 pears and 12 plums cost $5 on Monday!",
        "Don't stop — can't won't; e-mail me at a.b@c.org (tomorrow) … or call 555-0100.",
        "Ünïcödé   tabs\tand\nnewlines ｆｕｌｌ width and ١٢٣ Arabic digits in a longer sentence here.",
        "one two three four",
    ]
    for text in texts:
        shingles = theirs.get_shingles(text)
        sig = ours.signature(text)
        if shingles.size == 0:
            assert sig is None
        else:
            assert sig.ravel().tolist() == [h for band in theirs.get_signature(shingles) for h in band]


def _datatrove_clusters(rows: list[dict], tmp: Path) -> list[list[int]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader

    (tmp / "in").mkdir()
    (tmp / "in" / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = MinhashConfig()
    stages = [
        ([JsonlReader(str(tmp / "in")), MinhashDedupSignature(str(tmp / "sigs"), config=config)], 1),
        ([MinhashDedupBuckets(str(tmp / "sigs"), str(tmp / "buckets"), config=config)], config.num_buckets),
        ([MinhashDedupCluster(str(tmp / "buckets"), str(tmp / "ids"), config=config, save_cluster_id=True)], 1),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(tmp / f"logs{i}")).run()
    groups: dict[int, list[int]] = defaultdict(list)
    data = (tmp / "ids" / "000000.clusters").read_bytes()
    for doc, cluster in struct.iter_unpack("<II", data):
        groups[cluster].append(doc)
    return sorted(sorted(g) for g in groups.values())


def test_minhash_clusters_equal_datatrove(tmp_path):
    pytest.importorskip("datatrove.pipeline.dedup.minhash")
    rng = random.Random(3)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(400)]
    rows = []
    for i in range(30):
        words = [rng.choice(vocab) for _ in range(120)]
        rows.append({"id": f"o{i}", "text": " ".join(words)})
        for j in range(i % 4):  # 0-3 variants, each a few more words apart: some near the threshold
            variant = list(words)
            for k in rng.sample(range(len(variant)), 2 + 3 * j):
                variant[k] = rng.choice(vocab)
            rows.append({"id": f"o{i}v{j}", "text": " ".join(variant)})
    step = MinHashDedup(MinHashDedupConfig(type="minhash_dedup"))
    keys = [step.key({"text": r["text"]}) for r in rows]
    ours = step.clusters(np.arange(len(rows)), np.asarray(keys, dtype=np.uint64))
    theirs = _datatrove_clusters(rows, tmp_path)
    assert len(ours) >= 20
    assert ours == theirs


def test_a_part_without_minhash_keys_is_fine(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PART_DOCUMENTS", 2)
    rows = [{"id": "s1", "text": "too short"}, {"id": "s2", "text": "also short"}]
    rows += [{"id": f"d{i}", "text": " ".join(chr(97 + i) + chr(97 + j % 26) + chr(97 + j // 26) for j in range(40))}
             for i in range(8)]  # fmt: skip
    rows.append({"id": "dup", "text": rows[2]["text"]})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[SourceConfig(path="c.jsonl")], validation_fraction=0.3, steps=[{"type": "minhash_dedup"}])
    out = tmp_path / "out"
    out.mkdir()
    metrics = build_corpus(cfg, tmp_path, out)
    assert metrics["steps"]["minhash_dedup"]["removed"] == 1
