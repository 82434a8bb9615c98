"""The trace index and OLMoTrace's search: spans, counts and documents equal a brute-force scan of the training
tokens (u16 and u32 token ids, corpora of a few documents), the kept spans are the rarest by the index's unigram
probabilities, and a release built with `release.trace_index` is traced from the command line."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clearlm.trace.index import write_index
from clearlm.trace.query import TraceIndex, longest_matches, maximal_spans, open_index

pytest.importorskip("infini_gram.engine", reason="pip install infini-gram (CPython 3.11 Linux wheels)")


def _index(folder: Path, docs: list[list[int]], dtype: np.dtype) -> TraceIndex:
    size = write_index([(np.array(d), {"id": f"doc{i}", "source": "s", "license": "CC0-1.0", "stage": "pretraining"})
                        for i, d in enumerate(docs)], dtype, folder)  # fmt: skip
    (folder / "index.json").write_text(json.dumps({**size, "eos_id": 0}))
    return open_index(folder)


def _occurrences(docs: list[list[int]], q: list[int]) -> list[tuple[int, int]]:
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - len(q) + 1) if doc[i : i + len(q)] == q]


def _spans(docs, ids, delims, bow, min_len, max_cnt):
    """infini-gram's `attribute`, by brute force: from every word start, the longest span found in a document, cut
    after a delimiter, backed off to end before a word start, then the spans not inside an earlier one."""
    found = []
    for left in range(len(ids)):
        if ids[left] not in bow:
            continue
        n = 0
        while left + n < len(ids) and _occurrences(docs, ids[left : left + n + 1]):
            n += 1
        n = next((pos + 1 for pos in range(n - 1) if ids[left + pos] in delims), n)
        while n > 0 and not (left + n == len(ids) or ids[left + n] in bow):
            n -= 1
        count = len(_occurrences(docs, ids[left : left + n]))
        if n >= min_len and count <= max_cnt:
            found.append((left, left + n, count))
    kept, last = [], -1
    for left, right, count in found:
        if right > last:
            kept.append((left, right, count))
            last = right
    return kept


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_counts_spans_and_documents_equal_a_brute_force_scan(tmp_path, dtype):
    rng = random.Random(3)
    offset = 70_000 if dtype == np.uint32 else 0  # ids past u16's range
    for trial in range(12):
        vocab = rng.choice([3, 6, 12])
        docs = [[offset + rng.randrange(1, vocab) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 5))]
        bow = [offset + i for i in range(1, vocab) if rng.random() < 0.6]
        delims = [offset + 1]
        index = _index(tmp_path / f"{trial}", docs, np.dtype(dtype))
        search = index.search
        assert search.get_total_doc_cnt() == len(docs) and index.total == sum(len(d) + 1 for d in docs)
        for _ in range(15):  # n-gram counts and the documents of every occurrence
            d = rng.choice(docs)
            k = rng.randrange(len(d))
            q = d[k : k + rng.randint(1, 4)] if rng.random() < 0.7 else [offset + rng.randrange(1, vocab) for _ in "ab"]
            found = search.find(input_ids=q)
            where = _occurrences(docs, q)
            assert found["cnt"] == len(where), (docs, q)
            ptrs = [p for s, (lo, hi) in enumerate(found["segment_by_shard"]) for p in range(lo, hi)]
            hits = [search.get_doc_by_rank(s=0, rank=r, max_disp_len=100)["doc_ix"] for r in ptrs]
            assert sorted(hits) == sorted(d for d, _ in where)
        for _ in range(5):  # OLMoTrace's spans of a text: part copied from a document, part not
            d = rng.choice(docs)
            ids = d[rng.randrange(len(d)) :][:8] + [offset + rng.randrange(1, vocab) for _ in range(6)]
            reach = longest_matches(search, ids)
            for left in range(len(ids)):  # the longest match at every position, rank-0 texts included
                n = next(
                    k for k in range(len(ids) - left, -1, -1) if k == 0 or _occurrences(docs, ids[left : left + k])
                )
                assert reach[left] == n, (docs, ids, left)
            for min_len, max_count in ((1, None), (3, None), (1, 1)):
                ours = maximal_spans(search, ids, set(delims), set(bow), min_len, max_count)
                got = [(left, right, search.count(input_ids=ids[left:right])["count"]) for left, right in ours]
                expected = _spans(docs, ids, set(delims), set(bow), min_len, max_count or 1_000_000)
                assert got == expected, (docs, ids, min_len, max_count)


def test_the_kept_spans_are_the_rarest_and_carry_their_documents(tmp_path, chat_tok):
    from clearlm.trace.query import delimiters, trace, word_starts

    texts = ["the quick brown fox jumps over it", "What color is the sky? It is blue.", "Name a prime. Seven."] * 3
    docs = [[*chat_tok.encode(t).ids, chat_tok.token_to_id("<|endoftext|>")] for t in texts]
    index = _index(tmp_path, docs, np.dtype(np.uint16))
    ids = chat_tok.encode("I saw the quick brown fox jumps over a dog. What color is the sky? Green.").ids
    spans = trace(index, chat_tok, ids, density=0.5, documents=2)
    total = sum(len(d) + 1 for d in docs)  # the separator counts as a token of the index
    unigram = {t: sum(d.count(t) for d in docs) for t in set(ids)}

    def logprob(left: int, right: int) -> float:
        return sum(math.log(unigram[t]) - math.log(total) if unigram[t] else -10000.0 for t in ids[left:right])

    every = _spans(docs, ids, set(delimiters(chat_tok)), set(word_starts(chat_tok)), 1, 1_000_000)
    assert len(spans) == min(len(every), math.ceil(0.5 * len(ids))) and spans == sorted(spans, key=lambda s: s.start)
    ranked = sorted(logprob(left, right) for left, right, _ in every)
    for span in spans:
        assert span.unigram_logprob == pytest.approx(logprob(span.start, span.end), abs=1e-6)
        assert span.unigram_logprob <= ranked[len(spans) - 1] + 1e-9
        assert span.count == len(_occurrences(docs, ids[span.start : span.end])) and len(span.documents) == 2
        assert all(d.stage == "pretraining" and d.license == "CC0-1.0" and "[[" + span.text + "]]" in d.snippet
                   for d in span.documents)  # fmt: skip
        assert {d.id for d in span.documents} <= {f"doc{i}" for i, _ in _occurrences(docs, ids[span.start : span.end])}
    assert "quick brown fox jumps over" in " ".join(s.text for s in spans)


@pytest.mark.slow
def test_a_release_with_a_trace_index_is_traced_from_the_command_line(tmp_path, monkeypatch):
    from conftest import write_tiny_recipe

    from clearlm.errors import InputError
    from clearlm.pipeline import Pipeline
    from clearlm.recipe import load_recipe
    from clearlm.release.verify import verify_release

    recipe = write_tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "\n[release]\ntrace_index = true\n")
    release = Pipeline(load_recipe(str(recipe)), tmp_path / "runs").run("release").path
    info = json.loads((release / "trace" / "index.json").read_text())
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert info["stages"]["pretraining"]["documents"] == info["documents"] < len(corpus)  # the training split
    manifest = json.loads((release / "manifest.json").read_text())["outputs"]
    assert {f"trace/{name}" for name in ("tokenized.0", "table.0", "offset.0", "metadata.0", "index.json")} <= set(
        manifest)  # fmt: skip
    trained = {json.loads(line)["id"] for line in (release / "trace" / "metadata.0").read_text().splitlines()}
    doc = next(d for d in corpus if d["id"] in trained and d["source"] == "prose")
    words = doc["text"].split()[5:45]
    text = "As they say, " + " ".join(words) + " and zqxv."
    command = [sys.executable, "-m", "clearlm", "trace", str(release)]
    out = subprocess.run([*command, text, "--json", str(tmp_path / "t.json"), "--documents", "3"], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    spans = json.loads((tmp_path / "t.json").read_text())[0]["spans"]
    assert spans and all(1 <= len(s["documents"]) <= 3 and s["count"] >= len(s["documents"]) for s in spans)
    longest = max(spans, key=lambda s: s["end"] - s["start"])
    assert longest["text"].strip() in " ".join(words) and longest["end"] - longest["start"] >= 10
    if longest["count"] == 1:
        assert longest["documents"][0]["id"] == doc["id"] and longest["documents"][0]["license"] == "CC0-1.0"
    generations = subprocess.run([*command, "--generations"], capture_output=True, text=True)
    assert generations.returncode == 0, generations.stderr
    memorized = json.loads((release / "eval" / "memorization.json").read_text())
    assert json.loads((release / "openness.json").read_text())["information"]["memorization"] == memorized
    assert memorized["generation_spans"]["windows"] >= 0 and set(memorized["personal_data_in_generations"]) == {
        "email", "ip", "phone"}  # fmt: skip
    assert "## Memorization and leakage" in (release / "README.md").read_text()
    assert "Memorization and leakage" in (release / "report.html").read_text()
    traced = memorized["traced_generations"]
    generations = [json.loads(line) for line in (release / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(traced) == len(generations) and any(traced)
    for spans, g in zip(traced, generations, strict=True):
        assert all(0 <= s["start"] < s["end"] <= len(g["completion"]) and s["documents"] for s in spans)
    from test_pipeline import _chromium

    if _chromium():  # the report marks each traced span, its documents one click away (<details>)
        flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2000"]
        dom = subprocess.run([*flags, "--dump-dom", (release / "report.html").as_uri()], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert dom.returncode == 0 and "Uncaught" not in dom.stderr
        assert dom.stdout.count("<mark") == sum(len(s) for s in traced) - _overlapped(traced)
        assert dom.stdout.count("<details>") == sum(len(s) for s in traced)
    assert verify_release(release, tmp_path, tmp_path).reproduced  # the index is re-built and compared too
    monkeypatch.setitem(sys.modules, "infini_gram.engine", None)
    with pytest.raises(InputError, match="pip install infini-gram"):
        open_index(release / "trace")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_bytes((release / "tokenizer.json").read_bytes())
    missing = subprocess.run([*command[:-1], str(tmp_path / "bare"), "text"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no trace index here" in missing.stderr and missing.stderr.count("\n") == 1


def test_extractable_memorization_finds_a_planted_document_and_not_an_unseen_one(tmp_path):
    import torch

    from clearlm.model.generate import generate
    from clearlm.model.transformer import Transformer, TransformerConfig
    from clearlm.trace.memorization import PREFIX, SUFFIX, extractable, personal_data, sample_documents

    model = Transformer(TransformerConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, context=128))
    model.init_weights(0)
    with torch.no_grad():  # sharp distributions: a random document is not the model's greedy continuation
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 3.0))
    rng = random.Random(0)
    prompt = [rng.randrange(300) for _ in range(PREFIX)]
    planted = prompt + generate(model, [prompt], max_new_tokens=SUFFIX)[0].tokens  # what it would say: memorized
    unseen = [rng.randrange(300) for _ in range(PREFIX + SUFFIX)]
    found = extractable(model, [(planted, "planted", "web"), (unseen, "unseen", "code")])
    assert found["extracted_ids"] == ["planted"] and found["rate"] == 0.5
    assert found["per_source"] == {"code": {"documents": 1, "extracted": 0, "rate": 0.0},
                                   "web": {"documents": 1, "extracted": 1, "rate": 1.0}}  # fmt: skip
    # a short document is never sampled, nor a DPO rejected answer
    tokens = np.array(planted + [7] * 10 + unseen + unseen, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    spans = [(0, 64, "planted", "web", {}), (64, 74, "short", "web", {}), (74, 138, "unseen", "code", {}),
             (138, 202, "pushed-down", "code", {"part": "rejected"})]  # fmt: skip
    (tmp_path / "train.docs.jsonl").write_text("".join(json.dumps({"id": i, "source": s, "start": a, "end": b, **m})
                                                       + "\n" for a, b, i, s, m in spans))  # fmt: skip
    sampled = sample_documents(tmp_path, "train", "uint16", 5, seed=1)
    assert [(d[1], d[0]) for d in sampled] == [("planted", planted), ("unseen", unseen)]
    assert [d[2] for d in sample_documents(tmp_path, "train", "uint16", 5, seed=1, stage="SFT")] == [
        "web (SFT)", "code (SFT)"]  # fmt: skip
    text = "Mail ada@example.org or call (555) 123-4567 from 203.0.113.42. Nothing else."
    assert personal_data([text, "plain"]) == {"email": 1, "ip": 1, "phone": 1}


def test_the_contamination_audit_counts_items_sharing_13_tokens_with_the_training_data(tmp_path):
    from clearlm.trace.contamination import contamination

    rng = random.Random(5)
    words = [f"w{i}" for i in range(60)]
    docs_text = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(6)]
    tok = _word_tokenizer(words)
    index = _index(tmp_path / "index", [tok.encode(t).ids for t in docs_text], np.dtype(np.uint16))
    copied = " ".join(docs_text[2].split()[10:23])  # 13 words of a training document
    near = " ".join(docs_text[2].split()[10:22]) + " " + rng.choice(words)  # 12 of them, then another word
    rows = [{"task": "a", "doc_id": 0, "context": "x " + copied}, {"task": "a", "doc_id": 0, "context": "x " + copied},
            {"task": "a", "doc_id": 1, "context": " ".join(rng.choice(words) for _ in range(30))},
            {"task": "b", "doc_id": 0, "prompt": near}]  # fmt: skip
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = contamination(index, tok, tmp_path / "samples.jsonl")
    assert table["a"]["items"] == 2 and table["a"]["contaminated"] >= 1
    grams = {tuple(d.split()[i : i + 13]) for d in docs_text for i in range(len(d.split()) - 12)}
    brute = [any(tuple(t.split()[i : i + 13]) in grams for i in range(len(t.split()) - 12))
             for t in ("x " + copied, rows[2]["context"], near)]  # fmt: skip
    assert [table["a"]["contaminated"], table["b"]["contaminated"]] == [brute[0] + brute[1], int(brute[2])]


def _word_tokenizer(words: list[str]):
    """A tokenizer with one token per word (ids from 1), so that n tokens are n words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _overlapped(traced: list[list[dict]]) -> int:
    """Spans wholly inside the marked text before them (the report marks none for them)."""
    hidden = 0
    for spans in traced:
        end = 0
        for s in spans:
            hidden += s["end"] <= max(end, s["start"])
            end = max(end, s["end"])
    return hidden


def _index_documents(folder: Path) -> list[tuple[list[int], dict]]:
    """Every document of an index folder (its tokens between separators, its metadata line), read directly."""
    info = json.loads((folder / "index.json").read_text())
    tokens = np.fromfile(folder / "tokenized.0", dtype=np.dtype(info["token_dtype"]).newbyteorder("<"))
    cuts = [*np.flatnonzero(tokens == np.iinfo(tokens.dtype).max).tolist(), len(tokens)]
    metas = [json.loads(line) for line in (folder / "metadata.0").read_text().splitlines()]
    return [(tokens[a + 1 : b].tolist(), m) for a, b, m in zip(cuts[:-1], cuts[1:], metas, strict=True)]


@pytest.mark.slow
def test_post_training_data_is_in_the_trace_index_with_its_file_line_and_licence(tmp_path):
    """SFT examples (as truncated), DPO pairs trained on (prompt with chosen, with rejected; not the held-out ones) and
    RL prompts trained on are indexed with their file and line, licence and stage; a span of an SFT answer is traced to
    its row. The model is an outside folder, so the index holds the post-training data only and the card says so."""
    from conftest import write_outside_llama

    from clearlm.data.chat import ChatTemplate, encode_prompt, parse_preference_row, parse_sft_row, tokenize_pair
    from clearlm.data.chat import tokenize_sft as sft_ids
    from clearlm.pipeline import Pipeline
    from clearlm.recipe import load_recipe
    from clearlm.release.load import load_release

    folder = write_outside_llama(tmp_path / "outside")
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    chats = [{"messages": [{"role": "user", "content": f"Say {w}."},
                           {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(12))}]}
             for w in words * 2]  # fmt: skip
    chats.insert(2, {"messages": [{"role": "user", "content": "no answer"}]})  # line 3: a bad row, not indexed
    pairs = [{"prompt": f"Name {w} {i}.", "chosen": f" {w} {w}", "rejected": f" {w}"} for i, w in enumerate(words * 2)]
    prompts = [{"prompt": [{"role": "user", "content": f"Write {w}."}]} for w in words]
    for name, rows in (("chat", chats), ("pairs", pairs), ("prompts", prompts)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.toml").write_text(
        f'name = "x"\n[sft]\nbase = "{folder}"\ndata = [{{ path = "chat.jsonl", license = "CC0-1.0" }}]\nepochs = 1\n'
        '[dpo]\ndata = [{ path = "pairs.jsonl", license = "CC-BY-4.0" }]\nheld_out_fraction = 0.25\n'
        '[rlvr]\ndata = [{ path = "prompts.jsonl", license = "MIT" }]\nmax_steps = 1\nnum_generations = 2\n'
        'prompts_per_step = 2\nmax_completion_length = 4\nheld_out_fraction = 0.25\n'
        '[[rlvr.verifiers]]\nname = "python_parses"\n[release]\ntrace_index = true\n')  # fmt: skip
    pipe = Pipeline(load_recipe(tmp_path / "r.toml"), tmp_path / "runs")
    assert "trace" in pipe.stages() and "shards" not in pipe.stages()
    release = pipe.run("release").path
    docs = _index_documents(release / "trace")
    by_stage: dict[str, list] = {}
    for ids, meta in docs:
        by_stage.setdefault(meta["stage"], []).append((ids, meta))
    assert list(by_stage) == ["SFT", "DPO", "RL prompts"]
    info = json.loads((release / "trace" / "index.json").read_text())
    assert {s: c["documents"] for s, c in info["stages"].items()} == {s: len(d) for s, d in by_stage.items()}
    _, tok, _ = load_release(release)
    template, context = ChatTemplate(), 64
    lines = (tmp_path / "chat.jsonl").read_text().splitlines()
    assert [m["id"] for _, m in by_stage["SFT"]] == [f"chat.jsonl:{n}" for n in range(1, len(lines) + 1) if n != 3]
    for ids, meta in by_stage["SFT"]:
        assert meta["source"] == "chat.jsonl" and meta["license"] == "CC0-1.0"
        row = json.loads(lines[int(meta["id"].split(":")[1]) - 1])
        assert ids == sft_ids(tok, template, parse_sft_row(row))[0][:context]
    pair_lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    dpo = by_stage["DPO"]
    assert [m["part"] for _, m in dpo] == ["chosen", "rejected"] * (len(dpo) // 2)
    assert 0 < len(dpo) // 2 < len(pairs)  # the held-out pairs are not trained on
    assert len(dpo) // 2 == pipe.run("dpo").metrics["counts"]["pairs"]
    for ids, meta in dpo:
        assert meta["license"] == "CC-BY-4.0"
        prompt, chosen, rejected = tokenize_pair(tok, template, parse_preference_row(
            json.loads(pair_lines[int(meta["id"].split(":")[1]) - 1])))  # fmt: skip
        assert ids == prompt + (chosen if meta["part"] == "chosen" else rejected)
    rl = by_stage["RL prompts"]  # the prompts its one generation batch sampled, not every training prompt
    sampled = [json.loads(line)["prompt"] for line in (pipe.run("rlvr").path / "completions.jsonl").read_text()
               .splitlines()]  # fmt: skip
    assert len(rl) == 2 and all(m["license"] == "MIT" for _, m in rl)
    prompt_lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
    rows = [json.loads(prompt_lines[int(meta["id"].split(":")[1]) - 1]) for _, meta in rl]
    assert [r["prompt"] for r in rows] == list({json.dumps(p): p for p in sampled}.values())
    for (ids, _), row in zip(rl, rows, strict=True):
        assert ids == encode_prompt(tok, template, row["prompt"])
    card = (release / "README.md").read_text()
    assert f"SFT {len(by_stage['SFT'])} documents" in card and "not the base model's own training data" in card
    answer = json.loads(lines[5])["messages"][1]["content"]
    out = subprocess.run([sys.executable, "-m", "clearlm", "trace", str(release), answer, "--json",
                          str(tmp_path / "t.json"), "--min-tokens", "4"], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    spans = json.loads((tmp_path / "t.json").read_text())[0]["spans"]
    assert any(d["id"] == "chat.jsonl:6" and d["stage"] == "SFT" and d["license"] == "CC0-1.0"
               for s in spans for d in s["documents"])  # fmt: skip
