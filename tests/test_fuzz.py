"""Property-based tests over every reader and parser a user's file reaches: whatever the bytes, the result is
documents, a counted reject naming the file and line, or a one-line error naming the file; never a traceback.

Inputs are generated both as raw bytes and from the formats' own structure (JSON rows with any field of any
type, TOML recipes with real keys and wrong values), truncated and compressed as users' files arrive."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clearlm.data.chat import BadRow, read_preferences, read_sft
from clearlm.data.prompts import read_prompts
from clearlm.data.sources import read_source
from clearlm.errors import ClearlmError
from clearlm.eval.taskspec import load_docs, load_task_file
from clearlm.openness.audit import audit_folder, audit_mot
from clearlm.recipe import Recipe, SourceConfig, load_recipe
from clearlm.release.gguf import byte_level_vocabulary, export_gguf
from clearlm.release.load import load_release

# 300 cases a property in CI (3,300 in all); CLEARLM_FUZZ_CASES=3000 for a deeper search
CASES = settings(max_examples=int(os.environ.get("CLEARLM_FUZZ_CASES", "300")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

# JSON values of every type, nested a little; object keys drawn from the fields the readers look for
FIELDS = ["text", "id", "source", "license", "metadata", "added", "created", "messages", "role", "content",
          "prompt", "completion", "chosen", "rejected", "instruction", "input", "output", "country", "options",
          "answer", "tests", "entry_point", "instruction_id_list"]  # fmt: skip
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)
lines = st.lists(
    st.one_of(
        objects.map(lambda o: json.dumps(o).encode()),
        values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=30),
        st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    max_size=6,
).map(b"\n".join)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _one_line_naming(err: BaseException, *names: str) -> None:
    """A user-facing error: a ClearlmError, one line, naming the file (or the option) it is about."""
    assert isinstance(err, ClearlmError), f"{type(err).__name__}: {err}"
    message = str(err)
    assert "\n" not in message and any(n in message for n in names), message


def _compress(data: bytes, kind: str, cut: float | None) -> bytes:
    packed = {"gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress}.get(kind, lambda b: b)(data)
    return packed[: int(len(packed) * cut)] if cut is not None else packed


@CASES
@given(content=lines, kind=st.sampled_from(["jsonl", "jsonl.gz", "jsonl.zst", "txt"]),
       cut=st.none() | st.floats(0, 1))  # fmt: skip
def test_corpus_files_give_documents_counted_rejects_or_a_file_error(
    folder: Path, content: bytes, kind: str, cut: float | None
) -> None:
    path = folder / f"corpus.{kind}"
    path.write_bytes(_compress(content, kind.rsplit(".", 1)[-1], cut))
    rejects: list[ClearlmError] = []
    errors: list[ClearlmError] = []
    for doc in read_source(SourceConfig(path=path.name, license="CC0-1.0"), folder, rejects.append, errors.append):
        assert doc["text"].strip() and isinstance(doc["id"], str)
    for err in rejects:
        _one_line_naming(err, f"{path}:" if kind != "txt" else str(path))
    for err in errors:
        _one_line_naming(err, str(path))


@CASES
@given(rows=st.lists(objects, min_size=1, max_size=5), cut=st.none() | st.floats(0, 1))
def test_parquet_files_give_documents_counted_rejects_or_a_file_error(
    folder: Path, rows: list[dict[str, Any]], cut: float | None
) -> None:
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        assume(False)  # rows that pyarrow cannot hold in one table: no such file can exist
    path = folder / "corpus.parquet"
    try:
        pq.write_table(table, path)
    except pa.ArrowException:
        assume(False)  # a table parquet cannot store (a struct without fields)
    if cut is not None:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    rejects: list[ClearlmError] = []
    errors: list[ClearlmError] = []
    list(read_source(SourceConfig(path=path.name), folder, rejects.append, errors.append))
    for err in [*rejects, *errors]:
        _one_line_naming(err, str(path))


TINY = """name = "fuzz"
[data]
sources = [{ path = "corpus.jsonl", license = "CC0-1.0" }]
"""
# every setting of every section, so that generated overrides reach the validators of real keys
SETTINGS = sorted(
    f"{section}.{key}"
    for section, field in Recipe.model_fields.items()
    if hasattr(field.annotation, "model_fields")
    for key in field.annotation.model_fields
)
toml_values = st.one_of(
    st.integers(-(2**70), 2**70).map(str), st.floats().map(lambda f: repr(f).replace("inf", "inf").lower()),
    st.booleans().map(lambda b: str(b).lower()), st.text(max_size=10).map(json.dumps),
    st.lists(st.integers(-5, 5), max_size=3).map(str), st.text(max_size=12),
)  # fmt: skip


@CASES
@given(settings_=st.lists(st.tuples(st.sampled_from(SETTINGS) | st.text(max_size=10), toml_values), max_size=4),
       prefix=st.text(max_size=40), raw=st.booleans())  # fmt: skip
def test_recipes_and_overrides_load_or_give_one_line(
    folder: Path, settings_: list[tuple[str, str]], prefix: str, raw: bool
) -> None:
    path = folder / "recipe.toml"
    path.write_bytes((prefix if raw else "").encode("utf-8", "surrogatepass") + TINY.encode())
    overrides = [f"{key}={value}" for key, value in settings_]
    try:
        load_recipe(path, overrides)
    except Exception as err:
        _one_line_naming(err, str(path), "--set")


TASK_KEYS = ["name", "data_file", "doc_to_text", "doc_to_choice", "doc_to_target", "metrics", "output_type",
             "num_fewshot", "target_delimiter", "fewshot_delimiter", "license", "source", "process_docs"]  # fmt: skip


@CASES
@given(entries=st.dictionaries(st.sampled_from(TASK_KEYS) | st.text(max_size=8), toml_values, max_size=6),
       yaml=st.booleans())  # fmt: skip
def test_task_files_load_or_give_one_line(folder: Path, entries: dict[str, str], yaml: bool) -> None:
    path = folder / ("task.yaml" if yaml else "task.toml")
    text = "\n".join(f"{json.dumps(k)} {':' if yaml else '='} {v}" for k, v in entries.items())
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_task_file(path)
    except Exception as err:
        _one_line_naming(err, str(path))


CAPITALS = Path(__file__).resolve().parents[1] / "examples" / "tasks" / "capitals.toml"


@CASES
@given(content=lines, kind=st.sampled_from(["jsonl", "json", "csv"]))
def test_task_rows_load_or_give_one_line(folder: Path, content: bytes, kind: str) -> None:
    spec = load_task_file(CAPITALS).model_copy(update={"data_file": f"rows.{kind}"})
    path = folder / f"rows.{kind}"
    path.write_bytes(content)
    try:
        for doc in load_docs(spec, folder):
            assert 0 <= spec.target(doc) < len(spec.choices(doc))
    except Exception as err:
        _one_line_naming(err, str(path))


@CASES
@given(content=lines, kind=st.sampled_from(["jsonl", "json"]), reader=st.sampled_from(["sft", "preferences", "rl"]))
def test_chat_preference_and_rl_prompt_rows_parse_or_are_counted_rejects(
    folder: Path, content: bytes, kind: str, reader: str
) -> None:
    path = folder / f"rows.{kind}"
    path.write_bytes(content)
    try:
        for where, row in {"sft": read_sft, "preferences": read_preferences, "rl": read_prompts}[reader](path):
            assert re.fullmatch(rf"{re.escape(str(path))}(:\d+| item \d+)?", where), where
            if isinstance(row, BadRow):
                assert "\n" not in str(row)
    except Exception as err:
        _one_line_naming(err, str(path))


@CASES
@given(content=st.one_of(st.binary(max_size=200), values.map(lambda v: json.dumps(v).encode()),
                         st.text(alphabet=string.printable, max_size=200).map(str.encode)))  # fmt: skip
def test_mot_yaml_is_classified_or_gives_one_line(folder: Path, content: bytes) -> None:
    path = folder / "mot.yml"
    path.write_bytes(content)
    try:
        audit_mot(path)
    except Exception as err:
        _one_line_naming(err, str(path))


@CASES
@given(config=values | objects, tokenizer=st.binary(max_size=60) | values.map(lambda v: json.dumps(v).encode()),
       weights=st.binary(max_size=80), header=st.none() | values)  # fmt: skip
def test_model_folders_load_or_give_one_line(
    folder: Path, config: Any, tokenizer: bytes, weights: bytes, header: Any
) -> None:
    model = folder / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_bytes(tokenizer)
    if header is not None:  # a safetensors file whose header is any JSON value
        text = json.dumps(header).encode()
        weights = len(text).to_bytes(8, "little") + text + weights
    (model / "model.safetensors").write_bytes(weights)
    try:
        load_release(model)
    except Exception as err:
        _one_line_naming(err, str(model))
    try:
        export_gguf(model, folder / "out.gguf")
    except Exception as err:
        _one_line_naming(err, str(model))


@CASES
@given(spec=objects, vocab=st.dictionaries(st.text(max_size=4), values, max_size=4), merges=values,
       added=values, pre=values)  # fmt: skip
def test_tokenizers_given_to_gguf_export_give_a_vocabulary_or_one_line(
    folder: Path, spec: Any, vocab: dict, merges: Any, added: Any, pre: Any
) -> None:
    if isinstance(spec, dict):  # often a byte-level BPE around fuzzed parts, so that the parts are reached
        pre = {"type": "ByteLevel"} if isinstance(pre, bool) else pre
        spec = {**spec, "model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added,
                "pre_tokenizer": pre, "normalizer": None}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    try:
        tokens, types, _ = byte_level_vocabulary(folder, 64)
        assert len(tokens) == len(types) == 64
    except Exception as err:
        _one_line_naming(err, str(folder / "tokenizer.json"))


@CASES
@given(files=st.dictionaries(st.sampled_from(["config.json", "README.md", "mot.yml", "LICENSE", "model.bin",
                                              "weights.tar.gz", "data.zip", "train.py"]),
                             st.binary(max_size=120) | values.map(lambda v: json.dumps(v).encode())
                             | st.text(max_size=120).map(lambda t: ("---\n" + t).encode("utf-8", "surrogatepass")),
                             max_size=5))  # fmt: skip
def test_audit_reports_on_any_folder(folder: Path, files: dict[str, bytes]) -> None:
    audited = folder / "audited"
    shutil.rmtree(audited, ignore_errors=True)
    audited.mkdir()
    for name, content in files.items():
        (audited / name).write_bytes(content)
    report = audit_folder(audited)
    json.dumps(report)
    assert report["files"] == len(files)


@CASES
@given(rows=st.lists(objects, min_size=1, max_size=4), texts=st.lists(st.text(max_size=40), min_size=4, max_size=4))
def test_verifiers_score_any_row_or_count_an_error(rows: list[dict], texts: list[str]) -> None:
    """Verifiers read fields of user rows of any shape: a reward, None (does not apply) or a counted error."""
    from clearlm.verifiers import VERIFIERS, load, score

    verifiers = [load(name, 1.0, None, Path(".")) for name in VERIFIERS if name != "code_tests"]  # (sandbox: slow)
    completions = texts[: len(rows)]
    per, errors = score(verifiers, completions, rows)
    assert len(per) == len(rows) and all(len(r) == len(verifiers) for r in per)
    assert all("\n" not in e for e in errors)
