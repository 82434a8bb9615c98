"""Running out of disk space: one line naming the path and the space needed, and nothing half-written.

The large writes whose size is known beforehand (checkpoints) check the free space first and fail before
writing anything. Any other write that fails for lack of space is recognised wherever it surfaces: as an
`OSError` (ENOSPC, EDQUOT) from Python, numpy or torch, or as the message of an error raised by a Rust
library (safetensors, tokenizers, zstandard) that does not keep the errno.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from clearlm.errors import DiskFullError

_CODES = (errno.ENOSPC, errno.EDQUOT)
_MESSAGES = ("No space left on device", "Disk quota exceeded")
MARGIN = 1 << 20  # what the logs, manifests and lock files written beside a large write may take


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder`; files that vanish meanwhile are not counted."""
    total = 0
    for p in Path(folder).rglob("*") if Path(folder).exists() else []:
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


def require_space(path: Path, needed: int, what: str) -> None:
    """Raise DiskFullError before a write of `needed` bytes that the file system cannot take (the caller adds
    what to do next)."""
    free = free_bytes(path)
    if needed + MARGIN > free:
        raise DiskFullError(f"{path}: {what} needs {human(needed + MARGIN)} but {human(free)} is free there")


def disk_full(err: BaseException) -> Exception | None:
    """The error in `err`'s chain that says the disk is full (a DiskFullError, an OSError with ENOSPC or EDQUOT,
    or a Rust library's error quoting the OS's message), or None."""
    seen: set[int] = set()
    at: BaseException | None = err
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        if isinstance(at, DiskFullError) or (isinstance(at, OSError) and at.errno in _CODES):
            return at
        if isinstance(at, Exception) and any(m in str(at) for m in _MESSAGES):
            return at
        at = at.__cause__ or at.__context__
    return None


def failed_path(err: BaseException, default: Path) -> Path:
    """The file a disk-full error was writing: a copy's destination (`filename2`; `filename` is its source),
    else the file it names, else `default`."""
    for name in (getattr(err, "filename2", None), getattr(err, "filename", None)):
        if isinstance(name, (str, Path)):
            return Path(name)
    return default
