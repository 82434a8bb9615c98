import gzip
import json

import numpy as np
import pytest

from clearlm.data import builtin
from clearlm.data.corpus import build_corpus
from clearlm.data.documents import in_fraction, read_jsonl
from clearlm.data.shards import WindowSampler, write_shards
from clearlm.data.sources import read_source
from clearlm.data.tokenizer import load_tokenizer, special_tokens, train_tokenizer
from clearlm.errors import InputError
from clearlm.recipe import DataConfig, SourceConfig, TokenizerConfig

DOLMA = {"id", "text", "source", "added", "created", "metadata", "license"}


def test_builtin_corpus_has_code_and_docs_with_dolma_fields_and_licence():
    docs = list(builtin.stdlib_documents())
    sources = {d["source"] for d in docs}
    assert sources == {builtin.CODE, builtin.DOCS}
    assert all(set(d) == DOLMA and d["license"] == "Python-2.0" for d in docs)
    assert any(d["id"] == "cpython-stdlib/code/json/decoder.py" for d in docs)
    assert not any("/test/" in d["id"] or "site-packages" in d["id"] for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert [d["id"] for d in docs] == [d["id"] for d in builtin.stdlib_documents()], "order must be fixed"


def test_split_is_deterministic_and_roughly_the_fraction():
    keys = [f"module{i}" for i in range(4000)]
    chosen = [k for k in keys if in_fraction(k, 0.1)]
    assert chosen == [k for k in keys if in_fraction(k, 0.1)]
    assert 300 < len(chosen) < 500


def test_jsonl_reader_keeps_fields_and_fills_defaults(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"id": "x1", "text": "hello", "metadata": {"k": 1}}) + "\n\n" + json.dumps({"text": "b"}))
    docs = list(read_source(SourceConfig(path=str(f), license="MIT"), tmp_path))
    assert [d["id"] for d in docs] == ["x1", "a.jsonl:3"]
    assert docs[0]["source"] == "a" and docs[0]["license"] == "MIT" and docs[0]["metadata"]["k"] == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad.jsonl:2: invalid JSON"),
        ('{"id": 1}', r"bad.jsonl:2: field 'text' is missing or not a string"),
        ("[1, 2]", r"bad.jsonl:2: expected a JSON object"),
        ('{"text": "t", "metadata": 3}', r"bad.jsonl:2: field 'metadata' must be an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        list(read_source(SourceConfig(path=str(f)), tmp_path))


def test_more_bad_rows_name_file_line_and_field(tmp_path):
    cases = {
        b'{"text": "caf\xe9"}\n': "not valid UTF-8",
        b'{"text": "\\ud800"}\n': "field 'text' holds an unpaired surrogate",
        b'{"text": "t", "id": null}\n': "field 'id' must be a string or an integer",
        b'{"text": "t", "source": 3}\n': "field 'source' must be a string",
    }
    for raw, message in cases.items():
        f = tmp_path / "rows.jsonl"
        f.write_bytes(b'{"text": "fine"}\n' + raw)
        with pytest.raises(InputError, match=f"rows.jsonl:2: {message}"):
            list(read_source(SourceConfig(path=str(f)), tmp_path))


def test_gzip_jsonl_is_read_and_a_corrupt_one_is_an_input_error(tmp_path):
    good = tmp_path / "g.jsonl.gz"
    good.write_bytes(gzip.compress(b'{"id": "a", "text": "zipped"}\n'))
    assert [d["text"] for d in read_source(SourceConfig(path=str(good)), tmp_path)] == ["zipped"]
    bad = tmp_path / "b.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"b\.jsonl\.gz: cannot read"):
        list(read_source(SourceConfig(path=str(bad)), tmp_path))


def test_text_directory_is_one_document_per_file(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("alpha")
    (tmp_path / "books" / "b.md").write_text("# beta")
    (tmp_path / "books" / "skip.bin").write_bytes(b"\0")
    docs = list(read_source(SourceConfig(path="books", source="books", license="CC-BY-4.0"), tmp_path))
    assert [(d["id"], d["text"]) for d in docs] == [("books/a.txt", "alpha"), ("books/b.md", "# beta")]


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="data source not found"):
        list(read_source(SourceConfig(path="nowhere.jsonl"), tmp_path))


def test_corpus_splits_and_counts(tmp_path):
    from conftest import write_corpus

    write_corpus(tmp_path)
    cfg = DataConfig(sources=[SourceConfig(path="corpus.jsonl", license="CC0-1.0")], validation_fraction=0.2)
    out = tmp_path / "out"
    out.mkdir()
    metrics = build_corpus(cfg, tmp_path, out)
    train, val = list(read_jsonl(out / "train.jsonl")), list(read_jsonl(out / "validation.jsonl"))
    assert len(train) + len(val) == 60 and val
    assert metrics["documents"] == {"train": len(train), "validation": len(val)}
    assert metrics["licenses"] == {"code": "CC0-1.0", "prose": "CC0-1.0"}
    assert {d["id"] for d in train}.isdisjoint(d["id"] for d in val)
    histogram = metrics["length_histogram"]
    assert sum(map(sum, histogram.values())) == 60 and set(histogram) == {"code", "prose"}
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_duplicate_ids_are_rejected(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    cfg = DataConfig(sources=[SourceConfig(path="d.jsonl")])
    with pytest.raises(InputError, match=r"d\.jsonl:2: duplicate document id 'a' \(first seen at .*d\.jsonl:1\)"):
        build_corpus(cfg, tmp_path, tmp_path)


def test_tokenizer_and_shards(tmp_path):
    from conftest import write_corpus

    write_corpus(tmp_path)
    cfg = DataConfig(sources=[SourceConfig(path="corpus.jsonl")], validation_fraction=0.2)
    build_corpus(cfg, tmp_path, tmp_path)
    tcfg = TokenizerConfig(vocab_size=300)
    train_tokenizer(tcfg, tmp_path / "train.jsonl", tmp_path)
    tok = load_tokenizer(tmp_path)
    assert [tok.token_to_id(t) for t in special_tokens(tcfg)] == [0, 1, 2, 3, 4]
    text = "def value():\n    return ünïcode"
    assert tok.decode(tok.encode(text).ids) == text, "byte-level BPE must round-trip any text"
    mention = "see <|endoftext|> and <|user|>"
    assert not set(tok.encode(mention).ids) & {0, 1, 2, 3, 4}, "special tokens never come from plain text"
    assert tok.decode(tok.encode(mention).ids) == mention
    metrics = write_shards(tok, 0, tmp_path, tmp_path)
    tokens = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    offsets = np.load(tmp_path / "train.idx.npy")
    assert offsets[-1] == len(tokens) == metrics["train"]["tokens"]
    assert all(tokens[end - 1] == 0 for end in offsets[1:]), "every document ends with end-of-text"
    first = next(read_jsonl(tmp_path / "train.jsonl"))
    assert tok.decode(tokens[offsets[0] : offsets[1] - 1].tolist()) == first["text"]
    spans = list(read_jsonl(tmp_path / "train.docs.jsonl"))
    assert spans[0] == {"id": first["id"], "source": first["source"], "license": first["license"], "start": 0,
                        "end": int(offsets[1])}  # fmt: skip
    assert [s["end"] for s in spans] == offsets[1:].tolist()


def test_tokenizer_training_is_deterministic(tmp_path):
    from conftest import write_corpus

    write_corpus(tmp_path)
    cfg = DataConfig(sources=[SourceConfig(path="corpus.jsonl")], validation_fraction=0.2)
    build_corpus(cfg, tmp_path, tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        train_tokenizer(TokenizerConfig(vocab_size=300), tmp_path / "train.jsonl", tmp_path / name)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_sampler_visits_every_window_once_per_epoch_in_a_seeded_order():
    tokens = np.arange(101, dtype=np.uint16)
    s = WindowSampler(tokens, context=10, seed=1)
    assert s.n_windows == 10
    epoch0 = s.batch(0, 10)
    assert sorted(row[0].item() for row in epoch0) == list(range(0, 100, 10))
    assert all(row.tolist() == list(range(row[0], row[0] + 11)) for row in epoch0)
    assert not np.array_equal(epoch0.numpy(), s.batch(10, 10).numpy()), "each epoch has its own order"
    assert np.array_equal(s.batch(3, 4).numpy(), epoch0[3:7].numpy()), "any position can be resumed"
    assert np.array_equal(WindowSampler(tokens, 10, seed=1).batch(0, 10).numpy(), epoch0.numpy())
    assert not np.array_equal(WindowSampler(tokens, 10, seed=2).batch(0, 10).numpy(), epoch0.numpy())


def test_zstd_and_parquet_sources_and_a_truncated_zstd_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    payload = b'{"id": "z1", "text": "zstd text"}\n{"id": "z2", "text": "more"}\n'
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    assert [d["id"] for d in read_source(SourceConfig(path="a.jsonl.zst"), tmp_path)] == ["z1", "z2"]
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload * 50)[:-20])
    with pytest.raises(InputError, match=r"cut\.jsonl\.zst: cannot read"):
        list(read_source(SourceConfig(path="cut.jsonl.zst"), tmp_path))
    pq.write_table(pa.Table.from_pylist([{"id": "p1", "text": "from parquet"}, {"id": "p2", "text": None}]),
                   tmp_path / "b.parquet")  # fmt: skip
    docs = read_source(SourceConfig(path="b.parquet", license="MIT"), tmp_path)
    assert next(docs)["text"] == "from parquet"
    with pytest.raises(InputError, match=r"b\.parquet:2: field 'text' is missing or not a string"):
        next(docs)


def test_mixing_weights_sample_and_repeat_deterministically(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{i}", "text": f"alpha {i}"}) + "\n" for i in range(400))
    )
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"id": f"b{i}", "text": f"beta {i}"}) + "\n" for i in range(50))
    )
    cfg = DataConfig(
        sources=[SourceConfig(path="a.jsonl", weight=0.25), SourceConfig(path="b.jsonl", weight=2.5)],
        validation_fraction=0.1,
    )
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    out1.mkdir()
    out2.mkdir()
    metrics = build_corpus(cfg, tmp_path, out1)
    build_corpus(cfg, tmp_path, out2)
    assert (out1 / "train.jsonl").read_bytes() == (out2 / "train.jsonl").read_bytes()
    mix = metrics["mixing"]
    assert 70 < mix["a"]["documents_out"] < 130 and mix["a"]["documents_in"] == 400
    assert 100 <= mix["b"]["documents_out"] <= 150 and mix["b"]["weight"] == 2.5
    ids = [d["id"] for split in ("train", "validation") for d in read_jsonl(out1 / f"{split}.jsonl")]
    assert len(ids) == len(set(ids)) and any(i.endswith("#2") for i in ids)
    assert "## Mix" in (out1 / "data_card.md").read_text()


def test_bad_records_go_to_rejects_when_a_collector_is_given(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"text": "good"}\n{"text": "caf\xe9"}\n{"text": "   "}\n[1]\n{"text": "also good"}\n')
    rejects = []
    docs = list(read_source(SourceConfig(path=str(f)), tmp_path, on_reject=rejects.append))
    assert [d["text"] for d in docs] == ["good", "also good"]
    assert [(r.where.rsplit(":", 1)[1], r.reason) for r in rejects] == [
        ("2", "not valid UTF-8"), ("3", "field 'text' is empty"), ("4", "expected a JSON object, got list"),
    ]  # fmt: skip


def test_tail_validation_holds_out_the_end_of_a_text_file_from_a_line_start(tmp_path):
    lines = [f"line {i}: " + "word " * (i % 7) for i in range(100)]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(sources=[SourceConfig(path="book.txt", license="CC0-1.0", tail_validation=0.1)])
    (tmp_path / "out").mkdir()
    build_corpus(cfg, tmp_path, tmp_path / "out")
    train = [d["text"] for d in read_jsonl(tmp_path / "out" / "train.jsonl")]
    validation = [d["text"] for d in read_jsonl(tmp_path / "out" / "validation.jsonl")]
    assert len(train) == len(validation) == 1
    assert train[0] + validation[0] == (tmp_path / "book.txt").read_text(), "nothing lost, nothing repeated"
    assert train[0].endswith("\n") and validation[0].startswith("line ")
    assert 0.09 < len(validation[0]) / len((tmp_path / "book.txt").read_text()) < 0.12
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "the last 0.1 of each text file of `book.txt`" in card
    (tmp_path / "short.txt").write_text("one line only")
    short = SourceConfig(path="short.txt", tail_validation=0.5)
    with pytest.raises(InputError, match=r"too short to hold out its last 0\.5"):
        list(read_source(short, tmp_path))


def test_a_split_field_in_user_metadata_does_not_decide_the_split(tmp_path):
    rows = [{"id": f"d{i}", "text": f"document number {i} " * 5, "metadata": {"split": "test"}} for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    cfg = DataConfig(sources=[SourceConfig(path="docs.jsonl")], validation_fraction=0.2)
    metrics = build_corpus(cfg, tmp_path, tmp_path / "out")
    assert metrics["documents"]["train"] + metrics["documents"]["validation"] == 60
    assert metrics["documents"]["validation"] > 0


def test_an_empty_text_file_is_a_counted_reject(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(6):
        (notes / f"n{i}.txt").write_text(f"some words in note number {i}\n")
    (notes / "empty.txt").write_text("")
    (notes / "blank.md").write_text("  \n\n")
    (tmp_path / "out").mkdir()
    cfg = DataConfig(sources=[SourceConfig(path="notes", license="CC0-1.0")], validation_fraction=0.3)
    metrics = build_corpus(cfg, tmp_path, tmp_path / "out")
    assert metrics["documents"]["train"] + metrics["documents"]["validation"] == 6
    assert metrics["rejects"] == {"the file has no text": 2}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["where"].rsplit("/", 1)[-1] for r in rejects) == ["blank.md", "empty.txt"]


def test_a_link_out_of_a_source_folder_is_a_counted_reject_unless_named(tmp_path):
    """A folder of data must not pull in files elsewhere through a symbolic link (`~/.ssh`, `/etc`); naming the
    link in the recipe reads it."""
    from clearlm.data.sources import read_source
    from clearlm.recipe import SourceConfig

    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"text": "the password is hunter2"}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"text": "ordinary text"}) + "\n")
    (data / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (data / "nested").symlink_to(outside, target_is_directory=True)
    links = {
        "data": {data / "link.jsonl"},  # a folder is walked without entering linked folders
        "data/**/*.jsonl": {data / "link.jsonl", data / "nested" / "secret.jsonl"},
    }  # a glob enters them
    for path, escaping in links.items():
        rejects = []
        texts = [d["text"] for d in read_source(SourceConfig(path=path), tmp_path, rejects.append)]
        assert texts == ["ordinary text"], path
        assert {r.where for r in rejects} == {str(p) for p in escaping}, path
        assert all("a symbolic link out of the source's folder" in r.reason for r in rejects)
    named = [d["text"] for d in read_source(SourceConfig(path="data/link.jsonl"), tmp_path)]
    assert named == ["the password is hunter2"]
