"""Running out of disk space: one line naming the path and the space needed, and nothing half-written.

The large writes whose size is known beforehand (checkpoints) check the free space first and fail before
writing anything. Any other write that fails for lack of space is recognised wherever it surfaces: as an
`OSError` (ENOSPC, EDQUOT) from Python, numpy or torch, or as the message of an error raised by a Rust
library (safetensors, tokenizers, zstandard) that does not keep the errno.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from clearlm.errors import DiskFullError

_CODES = (errno.ENOSPC, errno.EDQUOT)
_MESSAGES = ("No space left on device", "Disk quota exceeded")
MARGIN = 1 << 20  # what the logs, manifests and lock files written beside a large write may take


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else 0


def require_space(path: Path, needed: int, what: str) -> None:
    """Raise DiskFullError before a write of `needed` bytes that the file system cannot take."""
    free = free_bytes(path)
    if needed + MARGIN > free:
        raise DiskFullError(f"{path}: {what} needs {human(needed + MARGIN)} but {human(free)} is free there; "
                            "free space, then run again")  # fmt: skip


def disk_full(err: BaseException) -> OSError | Exception | None:
    """The error in `err`'s chain that says the disk is full, or None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _CODES:
            return seen
        if isinstance(seen, Exception) and any(m in str(seen) for m in _MESSAGES):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def failed_path(err: BaseException, default: Path) -> Path:
    """The file a disk-full error names, else `default`."""
    name = getattr(err, "filename", None)
    return Path(name) if isinstance(name, (str, Path)) else default
