"""Readers for user data: jsonl (plain or gzip) with Dolma fields, and plain-text/markdown files."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from clearlm.data.documents import Document
from clearlm.errors import InputError
from clearlm.recipe import SourceConfig

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".md")
_STAMP = "1970-01-01T00:00:00"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def source_files(cfg: SourceConfig, base_dir: Path) -> list[Path]:
    """The files a source names, in a fixed order; a directory means every readable file under it."""
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
        raise InputError(f"{pattern}: no .jsonl, .jsonl.gz, .txt or .md files found")
    return files


def files_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_documents(path: Path, source: str, license: str) -> Iterator[Document]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise InputError(f"{where}: not valid UTF-8") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            text = row.get("text")
            if not isinstance(text, str):
                raise InputError(f"{where}: field 'text' is missing or not a string")
            metadata = row.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise InputError(f"{where}: field 'metadata' must be an object")
            doc_id = str(row.get("id", f"{path.name}:{lineno}"))
            yield Document(
                id=doc_id,
                text=text,
                source=str(row.get("source") or source),
                added=str(row.get("added") or _STAMP),
                created=str(row.get("created") or _STAMP),
                license=str(row.get("license") or license),
                metadata={**metadata, "file": path.name, "line": lineno, "split_key": doc_id},
            )


def _text_document(path: Path, root: Path, source: str, license: str) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8 text") from None
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return Document(
        id=f"{source}/{rel}",
        text=text,
        source=source,
        added=_STAMP,
        created=_STAMP,
        license=license,
        metadata={"file": rel, "split_key": f"{source}/{rel}"},
    )


def read_source(cfg: SourceConfig, base_dir: Path) -> Iterator[Document]:
    """Yield every document of a source, checking each row and naming the file and line on error."""
    files = source_files(cfg, base_dir)
    root = Path(cfg.path) if Path(cfg.path).is_absolute() else base_dir / cfg.path
    for path in files:
        name = cfg.source or path.name.split(".")[0]
        if _kind(path) == "jsonl":
            yield from _jsonl_documents(path, name, cfg.license)
        else:
            yield _text_document(path, root if root.is_dir() else path.parent, name, cfg.license)
