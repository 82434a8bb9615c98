"""Readers for user data: jsonl (plain or gzip) with Dolma fields, and plain-text/markdown files."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from clearlm.data import builtin
from clearlm.data.documents import Document
from clearlm.errors import InputError
from clearlm.recipe import DataConfig, DPOConfig, RLVRConfig, SFTConfig, SourceConfig, TokenizerConfig

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
_STAMP = "1970-01-01T00:00:00"
FIXED_SPLIT = "clearlm_split"  # metadata key of documents whose split the reader decided (tail_validation)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _found(cfg: SourceConfig, base_dir: Path) -> tuple[list[Path], list[Path]]:
    """(files to read, files that a folder or glob reaches through a symbolic link out of the source's folder).
    A link out is read only when the recipe names it itself: a folder of data must not pull in `~/.ssh` or
    `/etc` because someone left a link in it."""
    pattern = Path(cfg.path).expanduser()
    if not pattern.is_absolute():
        pattern = base_dir / pattern
    if any(ch in cfg.path for ch in "*?["):
        matches = [Path(p) for p in glob.glob(str(pattern), recursive=True)]
    elif pattern.is_dir():
        matches = list(pattern.rglob("*"))
    elif pattern.is_file():
        matches = [pattern]
    else:
        raise InputError(f"{pattern}: data source not found (data.sources path {cfg.path!r})")
    files = sorted(p for p in matches if p.is_file() and _kind(p))
    if not files:
        raise InputError(f"{pattern}: no .jsonl(.gz/.zst), .parquet, .txt or .md files found")
    if matches == [pattern]:  # named by the recipe itself
        return files, []
    root = source_root(cfg, base_dir).resolve()
    inside = [p for p in files if p.resolve().is_relative_to(root)]
    return inside, [p for p in files if p not in inside]


def source_files(cfg: SourceConfig, base_dir: Path) -> list[Path]:
    """The files a source names, in a fixed order; a directory means every readable file under it (but not a
    link out of it)."""
    return _found(cfg, base_dir)[0]


def files_digest(files: list[Path], root: Path) -> str:
    """Content digest of a source: each file's path relative to `root`, size and bytes."""
    h = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _zstd_lines(path: Path) -> Iterator[bytes]:
    """Lines of a zstd file, streamed; a file that ends inside a frame is reported as truncated
    (zstandard's stream reader would silently stop there)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor().decompressobj()
    pending = b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                pending += decompressor.decompress(chunk)
            except zstandard.ZstdError as e:
                raise OSError(str(e)) from None
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
    if not decompressor.eof:
        raise EOFError("compressed data ends before the end of its zstd frame (truncated file)")
    if pending:
        yield pending


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Numbered raw lines, streamed; a truncated or corrupt compressed file is a one-line error."""
    name = path.name.lower()
    try:
        if name.endswith(".zst"):
            yield from enumerate(_zstd_lines(path), 1)
        else:
            with gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb") as f:
                yield from enumerate(f, 1)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read ({e})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read parquet ({e})") from None


class BadRecord(InputError):
    """One unusable record: where it is and why. The data stage writes it to rejects.jsonl."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def _optional_str(row: dict[str, Any], field: str, where: str, default: str) -> str:
    value = row.get(field)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRecord(where, f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or the BadRecord that stands for an unreadable line)."""
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield lineno, BadRecord(where, "not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord(where, f"invalid JSON ({e.msg})")


def _row_document(path: Path, lineno: int, row: Any, source: str, license: str) -> Document:
    where = f"{path}:{lineno}"
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord(where, f"expected a JSON object, got {type(row).__name__}")
    text = row.get("text")
    if not isinstance(text, str):
        raise BadRecord(where, "field 'text' is missing or not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(where, "field 'text' holds an unpaired surrogate (not valid Unicode)") from None
    if not text.strip():
        raise BadRecord(where, "field 'text' is empty")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadRecord(where, "field 'metadata' must be an object")
    doc_id = row.get("id", f"{path.name}:{lineno}")
    if not isinstance(doc_id, str | int) or isinstance(doc_id, bool):
        raise BadRecord(where, f"field 'id' must be a string or an integer, got {type(doc_id).__name__}")
    return Document(
        id=str(doc_id),
        text=text,
        source=_optional_str(row, "source", where, source),
        added=_optional_str(row, "added", where, _STAMP),
        created=_optional_str(row, "created", where, _STAMP),
        license=_optional_str(row, "license", where, license),
        metadata={**metadata, "file": str(path), "line": lineno, "split_key": str(doc_id)},
    )


def _raise(record: BadRecord) -> None:
    raise record


def _text_documents(path: Path, root: Path, source: str, license: str, tail: float | None) -> Iterator[Document]:
    """One document per text file; with `tail`, two: the file's last `tail` share (from a line start) is
    held out for validation, as the char-level benchmarks split Tiny Shakespeare."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadRecord(str(path), "not valid UTF-8 text") from None
    if not text.strip():
        raise BadRecord(str(path), "the file has no text")
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    parts: list[tuple[str, str, dict[str, Any]]] = [("", text, {})]
    if tail is not None:
        cut = int(len(text) * (1 - tail))
        cut = cut if cut == 0 or text[cut - 1] == "\n" else text.find("\n", cut) + 1 or len(text)
        parts = [
            ("#train", text[:cut], {FIXED_SPLIT: "train"}),
            ("#validation", text[cut:], {FIXED_SPLIT: "validation"}),
        ]
        if not text[:cut].strip() or not text[cut:].strip():
            raise BadRecord(str(path), f"too short to hold out its last {tail:g} for validation")
    for suffix, part, split in parts:
        yield Document(
            id=f"{source}/{rel}{suffix}",
            text=part,
            source=source,
            added=_STAMP,
            created=_STAMP,
            license=license,
            metadata={"file": rel, "split_key": f"{source}/{rel}{suffix}", **split},
        )


def source_root(cfg: SourceConfig, base_dir: Path) -> Path:
    """The folder that relative document names are taken from."""
    path = Path(cfg.path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    while any(ch in path.name for ch in "*?[") or not path.is_dir():
        if path.parent == path:
            break
        path = path.parent
    return path


def read_source(
    cfg: SourceConfig,
    base_dir: Path,
    on_reject: Callable[[BadRecord], None] = _raise,
    on_file_error: Callable[[InputError], None] = _raise,
) -> Iterator[Document]:
    """Yield every document of a source. A bad record goes to `on_reject` (by default raised as a
    one-line error naming file, line and field); an unreadable file (corrupt or truncated
    compression) to `on_file_error`, after which reading goes on with the next file."""
    files, links_out = _found(cfg, base_dir)
    root = source_root(cfg, base_dir)
    for path in links_out:
        on_reject(BadRecord(str(path), f"a symbolic link out of the source's folder (to {path.resolve()}); name it "
                                       "in data.sources to read it"))  # fmt: skip
    for path in files:
        name = cfg.source or path.name.split(".")[0]
        kind = _kind(path)
        try:
            if kind == "text":
                try:
                    yield from _text_documents(path, root, name, cfg.license, cfg.tail_validation)
                except BadRecord as bad:
                    on_reject(bad)
                continue
            for lineno, row in _json_rows(path) if kind == "jsonl" else _parquet_rows(path):
                try:
                    yield _row_document(path, lineno, row, name, cfg.license)
                except BadRecord as bad:
                    on_reject(bad)
        except BadRecord:
            raise
        except InputError as e:
            on_file_error(e)


def folder_digest(folder: Path) -> str:
    """Content digest of every file under a folder (a model folder a stage starts from)."""
    return files_digest(sorted(p for p in folder.rglob("*") if p.is_file()), folder)


def post_training_sources(
    cfg: SFTConfig | DPOConfig | RLVRConfig, base: Path, tok_cfg: TokenizerConfig
) -> tuple[list[Path], dict[str, Any]]:
    """A post-training stage's data files and the digests that identify them (and a base or reference folder,
    with the recipe's tokenizer settings, which decide the chat tokens added to a folder's tokenizer)."""
    files = [base / d.path for d in cfg.data]
    extra: dict[str, Any] = {"data": [{"path": d.path, "digest": files_digest([f], base)}
                                      for d, f in zip(cfg.data, files, strict=True)]}  # fmt: skip
    from clearlm.stages import STAGES  # the stage names a base may be (else it is a folder)

    if cfg.base != "pretrain" and cfg.base not in STAGES:
        extra["base"] = folder_digest(base / cfg.base)
        extra["tokenizer"] = tok_cfg.model_dump(mode="json")
    if getattr(cfg, "reference", None):
        extra["reference"] = folder_digest(base / cfg.reference)
    return files, extra


def data_identity(cfg: DataConfig, base_dir: Path) -> dict[str, Any]:
    """Digests of the raw inputs, so edited source files re-run the data stage and all after it."""
    identity: dict[str, Any] = {}
    if cfg.builtin:
        identity["builtin"] = builtin.corpus_identity()
    identity["sources"] = [
        {"path": src.path, "digest": files_digest(source_files(src, base_dir), source_root(src, base_dir))}
        for src in cfg.sources
    ]
    return identity


def data_config(cfg: DataConfig) -> dict[str, Any]:
    """The settings that decide the output: how many workers run it, and where, do not."""
    return cfg.model_dump(mode="json", exclude={"workers", "executor", "ray_address"})
