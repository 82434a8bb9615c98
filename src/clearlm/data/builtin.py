"""The built-in corpus: the CPython standard library of the running interpreter (Python-2.0).

Every Python installation carries it, so the quickstart needs no network and the repository ships no
third-party text. Module sources form the `cpython-stdlib/code` domain (code and docstrings); the
reference documentation in `pydoc_data/topics.py` forms `cpython-stdlib/docs`.
"""

from __future__ import annotations

import platform
import sysconfig
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from clearlm.data.documents import Document

LICENSE = "Python-2.0"
CODE, DOCS = "cpython-stdlib/code", "cpython-stdlib/docs"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TOPICS = "pydoc_data/topics.py"


def _build_date() -> str:
    """The interpreter's build date: a fixed, reproducible timestamp for `created` and `added`."""
    try:
        return datetime.strptime(platform.python_build()[1], "%b %d %Y %H:%M:%S").isoformat()
    except ValueError:
        return "1970-01-01T00:00:00"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_identity() -> dict[str, str]:
    """What determines the built-in corpus's content: part of the data stage's digest."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "build": " ".join(platform.python_build()),
    }


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stdlib_documents() -> Iterator[Document]:
    """Yield documents in a fixed order; `metadata.split_key` decides the train/validation split."""
    root = stdlib_dir()
    stamp = _build_date()
    version = platform.python_version()
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    for path in files:
        rel = path.relative_to(root)
        if rel.as_posix() == _TOPICS or rel.name.startswith("_sysconfigdata"):
            continue  # topics form the docs domain; sysconfigdata holds this install's paths
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        module = _module_name(rel)
        yield Document(
            id=f"{CODE}/{rel.as_posix()}",
            text=text,
            source=CODE,
            added=stamp,
            created=stamp,
            license=LICENSE,
            metadata={"path": rel.as_posix(), "module": module, "python": version, "split_key": module},
        )
    yield from _topic_documents(stamp, version)


def _topic_documents(stamp: str, version: str) -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        text = topics[key]
        if not text.strip():
            continue
        yield Document(
            id=f"{DOCS}/{key}",
            text=text,
            source=DOCS,
            added=stamp,
            created=stamp,
            license=LICENSE,
            metadata={"path": _TOPICS, "topic": key, "python": version, "split_key": f"topic:{key}"},
        )
