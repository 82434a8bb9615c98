"""Cleaning steps, and their keep/drop decisions against datatrove's filters on the same documents."""

import json
from pathlib import Path

import numpy as np
import pytest

from clearlm.data.corpus import build_corpus
from clearlm.data.documents import read_jsonl
from clearlm.data.steps import Removed, build_steps
from clearlm.recipe import DataConfig, SourceConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _doc(text: str, i: int = 0) -> dict:
    return {"id": f"d{i}", "text": text, "source": "s", "added": "", "created": "", "license": "", "metadata": {}}


def _run(step_type: str, text: str, **settings):
    ((_, step),) = build_steps(DataConfig(builtin="cpython-stdlib", steps=[{"type": step_type, **settings}]).steps)
    return step(_doc(text))


PROSE = (
    " ".join(["The cat sat on the mat and looked at the dog with great interest."] * 2)
    + " "
    + " ".join(f"Sentence number {i} talks about the weather, the river and the town." for i in range(8))
)


def test_gopher_quality_rules():
    assert not isinstance(_run("gopher_quality", PROSE), Removed)
    assert _run("gopher_quality", "too short to keep") == Removed("gopher_short_doc")
    hashes = PROSE + " #" * 40
    assert _run("gopher_quality", hashes) == Removed("gopher_too_many_hashes")
    no_stop = " ".join(f"word{i} apple" for i in range(60))
    assert _run("gopher_quality", no_stop) == Removed("gopher_enough_stop_words")


def test_gopher_repetition_and_c4_rules():
    repeated = "\n".join(["The same line again and again."] * 10)
    assert _run("gopher_repetition", repeated) == Removed("dup_line_frac")
    assert _run("c4_quality", "Lorem ipsum dolor sit amet, consectetur.\n" + PROSE) == Removed("lorem_ipsum")
    kept = _run("c4_quality", PROSE.replace(". ", ".\n") + "\nno terminal punctuation here\nEnable JavaScript now.")
    assert "no terminal" not in kept["text"] and "JavaScript" not in kept["text"]


def test_normalize_and_exact_dedup():
    assert _run("normalize", "cafe\u0301  \r\nline  \r\n")["text"] == "caf\u00e9\nline\n"
    assert _run("normalize", " \r\n ") == Removed("empty")
    ((_, dedup),) = build_steps(DataConfig(builtin="cpython-stdlib", steps=[{"type": "exact_dedup"}]).steps)
    keys = np.asarray([dedup.key(_doc(t)) for t in ("Hello   World", "hello there", "hello world")], dtype=np.uint64)
    removed, _ = dedup.resolve(np.asarray([4, 7, 9]), keys)
    assert removed == {9: 4}, "the later copy goes, whatever the spacing and case"


def test_corpus_records_removed_documents_and_step_statistics(tmp_path):
    rows = [{"id": f"k{i}", "text": PROSE.replace("cat", f"cat{i}")} for i in range(12)]
    rows += [{"id": "short", "text": "tiny"}, {"id": "dup", "text": rows[0]["text"].replace(" ", "  \n")}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        sources=[SourceConfig(path="c.jsonl", license="CC0-1.0")],
        validation_fraction=0.2,
        steps=[{"type": "gopher_quality"}, {"type": "exact_dedup"}],
    )
    metrics = build_corpus(cfg, tmp_path, tmp_path)
    removed = {r["id"]: (r["step"], r["reason"]) for r in read_jsonl(tmp_path / "removed.jsonl")}
    assert removed == {"short": ("gopher_quality", "gopher_short_doc"), "dup": ("exact_dedup", "exact_duplicate")}
    assert metrics["steps"]["gopher_quality"]["documents_in"] == 14
    assert metrics["steps"]["exact_dedup"]["reasons"] == {"exact_duplicate": 1}
    assert metrics["before_steps"]["c"]["documents"] == 14 and sum(metrics["documents"].values()) == 12


def test_removed_documents_can_be_sampled_and_counts_stay_complete(tmp_path):
    rows = [{"id": f"k{i}", "text": PROSE.replace("cat", f"cat{i}")} for i in range(12)]
    rows += [{"id": f"short{i}", "text": f"tiny {i}"} for i in range(200)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    listed = {}
    for sample in (1.0, 0.25):
        out = tmp_path / str(sample)
        out.mkdir()
        cfg = DataConfig(sources=[SourceConfig(path="c.jsonl")], validation_fraction=0.2, removed_sample=sample,
                         steps=[{"type": "gopher_quality"}])  # fmt: skip
        metrics = build_corpus(cfg, tmp_path, out)
        assert metrics["steps"]["gopher_quality"]["removed"] == 200
        listed[sample] = [r["id"] for r in read_jsonl(out / "removed.jsonl")]
    assert len(listed[1.0]) == 200 and 25 < len(listed[0.25]) < 75
    assert set(listed[0.25]) < set(listed[1.0])
    assert "25% sample of removed documents" in (tmp_path / "0.25" / "data_card.md").read_text()


def _parity_corpus() -> list[str]:
    """Real text of several kinds plus documents built to trip each rule."""
    texts = []
    for name in ("tinystories_sample/tinystories_valid_head.txt", "wikitext2_raw_test/wiki.test.raw.nonempty.txt"):
        lines = (SHARED / name).read_text(encoding="utf-8").splitlines()
        texts += ["\n".join(lines[i : i + 12]) for i in range(0, 1200, 12)]
    emma = (SHARED / "gutenberg_nltk" / "austen-emma.txt").read_text(encoding="utf-8")
    texts += [emma[i : i + 3000] for i in range(0, 150_000, 3000)]
    from pydoc_data.topics import topics

    texts += [topics[k] for k in sorted(topics)[:40]]
    texts += [
        "- item one\n- item two\n- item three\n" * 20,
        "Wait for it...\nAnd then...\nNothing happened...\n" * 15,
        "Please enable javascript to view this page. " * 30,
        "We use cookies. Read our privacy policy.\n" * 10 + PROSE,
        "function f() { return 1; }\n" + PROSE,
        PROSE + "\n\n" + PROSE + "\n\n" + PROSE,
        "Lorem ipsum dolor sit amet.\n" + PROSE,
    ]
    return texts


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_filter_decisions_equal_datatrove():
    pytest.importorskip("spacy")
    datatrove = pytest.importorskip("datatrove.pipeline.filters")
    from datatrove.data import Document

    theirs = {
        "gopher_quality": datatrove.GopherQualityFilter(),
        "gopher_repetition": datatrove.GopherRepetitionFilter(),
        "c4_quality": datatrove.C4QualityFilter(),
    }
    texts = _parity_corpus()
    assert len(texts) > 250
    for name, peer in theirs.items():
        ((_, ours),) = build_steps(DataConfig(builtin="cpython-stdlib", steps=[{"type": name}]).steps)
        decisions = {"kept": 0, "removed": 0}
        for i, text in enumerate(texts):
            doc = Document(text=text, id=str(i))
            verdict = peer.filter(doc)
            mine = ours(_doc(text, i))
            if verdict is True:
                assert not isinstance(mine, Removed), (name, i, mine)
                assert mine["text"] == doc.text, (name, i)  # C4 rewrites kept text: same rewrite
                decisions["kept"] += 1
            else:
                reason = verdict[1] if isinstance(verdict, tuple) else None
                assert isinstance(mine, Removed) and mine.reason == reason, (name, i, mine, reason)
                decisions["removed"] += 1
        assert decisions["kept"] and decisions["removed"], (name, decisions)


def test_pii_is_masked_with_dolma_tokens_and_counted(tmp_path):
    rows = [{"id": "p", "text": "Write to jane.doe@example.org or 10.0.0.12, phone 555-123-4567. Version 1.2.3 stays."}]
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"id": "q", "text": "x"})
    )
    cfg = DataConfig(sources=[SourceConfig(path="p.jsonl")], validation_fraction=0.4, steps=[{"type": "pii"}])
    metrics = build_corpus(cfg, tmp_path, tmp_path)
    texts = [d["text"] for s in ("train", "validation") for d in read_jsonl(tmp_path / f"{s}.jsonl")]
    masked = next(t for t in texts if "Write" in t)
    assert masked == "Write to |||EMAIL_ADDRESS||| or |||IP_ADDRESS|||, phone |||PHONE_NUMBER|||. Version 1.2.3 stays."
    assert metrics["steps"]["pii"]["counts"] == {"email": 1, "ip": 1, "phone": 1}
    assert "email masked: 1" in (tmp_path / "data_card.md").read_text()


def test_decontamination_removes_a_planted_benchmark_passage(tmp_path):
    task = tmp_path / "qa.jsonl"
    question = "Which gas do plants absorb from the air to make their food during photosynthesis in sunlight"
    task.write_text(json.dumps({"q": question, "choices": ["carbon dioxide", "oxygen"], "gold": 0}) + "\n")
    (tmp_path / "qa.toml").write_text(
        'name = "qa"\ndata_file = "qa.jsonl"\ndoc_to_text = "Question: {{q}}\\nAnswer:"\n'
        'doc_to_choice = "{{choices}}"\ndoc_to_target = "{{gold}}"\n'
    )
    planted = f"Homework help. {question.upper()}? Answer: Carbon dioxide, of course."
    rows = [{"id": "leak", "text": planted}] + [{"id": f"ok{i}", "text": f"{PROSE} {i}"} for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        sources=[SourceConfig(path="c.jsonl")],
        validation_fraction=0.3,
        steps=[{"type": "decontaminate", "task_files": ["qa.toml"]}],
    )
    metrics = build_corpus(cfg, tmp_path, tmp_path)
    removed = list(read_jsonl(tmp_path / "removed.jsonl"))
    assert [(r["id"], r["reason"]) for r in removed] == [("leak", "overlaps qa")]
    assert metrics["steps"]["decontaminate"]["reasons"] == {"overlaps qa": 1}


def test_minhash_removes_planted_near_duplicates_and_keeps_unrelated_documents(tmp_path):
    pytest.importorskip("xxhash")
    import random

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(3000)]
    originals = [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(40)]
    rows = [{"id": f"o{i}", "text": t} for i, t in enumerate(originals)]
    for i in range(5):  # two words, punctuation and case changed: still near-duplicates
        words = originals[i].split()
        for j in rng.sample(range(len(words)), 2):  # Jaccard ~0.9: found with probability > 0.999
            words[j] = "changed"
        rows.append({"id": f"near{i}", "text": " ".join(words).upper() + "!!"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[SourceConfig(path="m.jsonl")], validation_fraction=0.2, steps=[{"type": "minhash_dedup"}])
    metrics = build_corpus(cfg, tmp_path, tmp_path)
    removed = sorted((r["id"], r["duplicate_of"]) for r in read_jsonl(tmp_path / "removed.jsonl"))
    assert removed == [(f"near{i}", f"o{i}") for i in range(5)]
    assert metrics["steps"]["minhash_dedup"]["counts"] == {"clusters of 1": 35, "clusters of 2": 5}


def test_two_workers_give_byte_identical_output(tmp_path):
    rows = [{"id": f"d{i}", "text": f"{PROSE} Mail me at user{i % 7}@example.com. " * (1 + i % 3)} for i in range(150)]
    rows += [{"id": "short", "text": "tiny"}, {"id": "again", "text": rows[3]["text"]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        cfg = DataConfig(
            sources=[SourceConfig(path="c.jsonl")], validation_fraction=0.2, workers=workers,
            steps=[{"type": "normalize"}, {"type": "gopher_quality"}, {"type": "pii"}, {"type": "exact_dedup"}],
        )  # fmt: skip
        metrics = build_corpus(cfg, tmp_path, out)
        files = {name: (out / name).read_bytes() for name in ("train.jsonl", "validation.jsonl", "removed.jsonl")}
        outputs.append((files, metrics))
    assert outputs[0] == outputs[1]
    assert outputs[0][1]["steps"]["pii"]["counts"]["email"] > 100
    assert outputs[0][1]["steps"]["exact_dedup"]["removed"] >= 1


def test_language_identification_keeps_english_and_records_the_score():
    pytest.importorskip("py3langid")
    english = _run("language", PROSE)
    assert english["metadata"]["language"] == "en" and english["metadata"]["language_score"] > 0.9
    german = "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann schnell nach Hause."
    assert _run("language", german) == Removed("language_de")
    assert _run("language", german, languages=["de"])["metadata"]["language"] == "de"


PII_VALUES = [("email", "jane.doe@example.org"), ("ip", "203.0.113.42"), ("phone", "555-123-4567"),
              ("phone", "(555) 123-4567"), ("phone", "+1 555 123 4567")]  # fmt: skip
AROUND = [(" ", "."), (" ", ","), (" ", ";"), (" ", ":"), (" ", "!"), (" ", "?"), ("(", ")"), ("[", "]"), ("{", "}"),
          ("<", ">"), ('"', '"'), ("'", "'"), ("“", "”"), ("\n", "\n"), ("\t", "\r\n"), (" ", ".)")]  # fmt: skip


@pytest.mark.parametrize(("kind", "value"), PII_VALUES)
@pytest.mark.parametrize(("before", "after"), AROUND)
def test_every_pii_kind_is_masked_beside_punctuation_brackets_quotes_and_line_ends(kind, value, before, after):
    from clearlm.data.pii import PATTERNS, MaskPII
    from clearlm.recipe import PIIConfig

    doc = {"id": "d", "text": f"Reach it at{before}{value}{after} today", "source": "s"}
    masked = MaskPII(PIIConfig(type="pii"))(doc)
    assert masked.doc["text"] == f"Reach it at{before}{PATTERNS[kind][1]}{after} today"
    assert masked.counts == {kind: 1}


@pytest.mark.parametrize("text", ["Version 1.2.3.4.5 is out.", "Build 10.0.0.256 failed.", "See 1.2.3.4.5."])
def test_dotted_numbers_that_are_not_addresses_stay(text):
    from clearlm.data.pii import MaskPII
    from clearlm.recipe import PIIConfig

    doc = {"id": "d", "text": text, "source": "s"}
    assert MaskPII(PIIConfig(type="pii"))(doc) is doc


def test_every_step_a_recipe_can_name_is_in_the_one_registry():
    from typing import get_args

    from clearlm.data.steps import STEPS, build_steps
    from clearlm.recipe import StepConfig

    configs = {get_args(cls.model_fields["type"].annotation)[0]: cls for cls in get_args(get_args(StepConfig)[0])}
    assert set(configs) == set(STEPS) and len(configs) == 9
    defaults = [cls(type=name) for name, cls in configs.items() if name != "decontaminate"]  # it needs task files
    assert [name for name, _ in build_steps(defaults)] == [cfg.type for cfg in defaults]
