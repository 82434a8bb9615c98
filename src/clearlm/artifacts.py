"""Artifacts: directories with a manifest, addressed by a digest of what produced them.

An artifact's digest hashes its kind, its config, its inputs' digests and the clearlm version, so a
stage whose digest already exists on disk can be skipped, and a changed setting re-runs exactly the
stages downstream of it. Stages write into `<name>.partial/` and the directory is renamed into place
only when its manifest is complete, so a half-written artifact never looks finished. One process at a
time builds an artifact: it holds the artifact's lock (`flock`, which the kernel releases when the
process dies, even by kill -9), and another run that needs the same artifact waits, then finds it built.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from clearlm import __version__
from clearlm.errors import ArtifactError, InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
_ENV_PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "pydantic")


@dataclass(frozen=True)
class Artifact:
    kind: str
    digest: str
    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def ref(self) -> dict[str, str]:
        return {"kind": self.kind, "digest": self.digest}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@functools.cache
def code_version() -> str:
    """clearlm's version plus a digest of its source files: any change to the code changes every digest.

    Coarser than per-stage fingerprints, but an artifact can never be reused by code that would have
    built it differently.
    """
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml") and p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def compute_digest(kind: str, config: Any, inputs: dict[str, str], extra: Any = None) -> str:
    """The identity of an artifact: what it is, how it was configured, what it was made from (its inputs'
    digests, by name), by which code."""
    payload = {
        "kind": kind,
        "clearlm_version": code_version(),
        "config": config,
        "inputs": dict(sorted(inputs.items())),
        "extra": extra,
    }
    return "sha256:" + hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for pkg in _ENV_PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    return env


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _output_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


class ArtifactStore:
    """A directory of artifacts named `<kind>-<short digest>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, kind: str, digest: str) -> Path:
        return self.root / f"{kind}-{digest.removeprefix('sha256:')[:16]}"

    def partial_path(self, kind: str, digest: str) -> Path:
        final = self.path_for(kind, digest)
        return final.with_name(final.name + ".partial")

    def lookup(self, kind: str, digest: str) -> Artifact | None:
        """The complete artifact with this digest, or None if absent or damaged."""
        path = self.path_for(kind, digest)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("digest") != digest or manifest.get("kind") != kind:
            return None
        if not all((path / rel).is_file() for rel in manifest.get("outputs", {})):
            return None
        return Artifact(kind, digest, path, manifest)

    @contextlib.contextmanager
    def building(self, kind: str, digest: str, note: Callable[[str], None]) -> Iterator[None]:
        """Hold the artifact's lock while building it. If another process holds it, say which and wait; if the
        last holder died while building (its record is still in the lock file), say that its work is taken over."""
        if fcntl is None:  # pragma: no cover - Windows: no advisory locks here; one run per work directory
            yield
            return
        lock = self.root / ".locks" / f"{self.path_for(kind, digest).name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                note(f"{kind}: waiting for {_holder(f) or 'another process'}, which is building it")
                fcntl.flock(f, fcntl.LOCK_EX)
            else:
                if holder := _holder(f):
                    note(f"{kind}: {holder} stopped while building it (killed?); taking over its work")
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)}))
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()  # an empty lock file: its last holder finished
                f.flush()

    def require_intact(self, art: Artifact) -> None:
        """Check an artifact's files against its manifest before a stage reads them; not the checkpoints'
        optimizer state, which only a resume reads (and checks against the checkpoint's own checksums)."""
        require_intact(art.path, art.manifest.get("outputs", {}), MANIFEST,
                       f"delete {art.path} and run again to rebuild it",
                       only=lambda rel: "/optimizer/" not in rel)  # fmt: skip

    def start(self, kind: str, digest: str, keep_partial: bool = False) -> Path:
        """A clean (or, with keep_partial, the existing) working directory for building an artifact."""
        partial = self.partial_path(kind, digest)
        if partial.exists() and not keep_partial:
            shutil.rmtree(partial)
        for stray in sorted(partial.rglob("*.tmp"), reverse=True) if partial.exists() else []:
            # a write cut short (kill, full disk) before its rename: never complete, and not an output
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink(missing_ok=True)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def finish(
        self,
        kind: str,
        digest: str,
        config: Any,
        inputs: dict[str, Artifact],
        metrics: dict[str, Any],
        seconds: float,
        sources: Any = None,
        numerics: dict[str, Any] | None = None,
    ) -> Artifact:
        """Hash every output, write the manifest and rename the directory into place.

        `sources` identifies raw inputs that are not artifacts (source files, the built-in corpus); `numerics`,
        the thread count and math-library modes the stage ran with, joins the environment.
        """
        partial = self.partial_path(kind, digest)
        manifest = {
            "kind": kind,
            "digest": digest,
            "clearlm_version": code_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "inputs": {name: art.ref() for name, art in sorted(inputs.items())},
            "sources": sources,
            "outputs": {p.relative_to(partial).as_posix(): sha256_file(p) for p in _output_files(partial)},
            "environment": {**environment(), **(numerics or {})},
            "command": sys.argv,
            "seconds": round(seconds, 3),
            "metrics": metrics,
        }
        write_json_atomic(partial / MANIFEST, manifest)
        final = self.path_for(kind, digest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for rel, sha in manifest["outputs"].items():  # just hashed: a later stage reading them need not hash again
            _VERIFIED.add(_identity(final / rel, sha))
        # as later runs will read it (keys sorted, tuples as lists), so nothing downstream depends on whether
        # this stage was built in this process or found on disk
        return Artifact(kind, digest, final, json.loads((final / MANIFEST).read_text()))


def _holder(lock_file: Any) -> str | None:
    """The process a lock file names ("process 123 (clearlm run ...)"), or None when it names none."""
    lock_file.seek(0)
    try:
        record = json.loads(lock_file.read() or "null")
    except ValueError:
        return None
    if not isinstance(record, dict) or "pid" not in record:
        return None
    return f"process {record['pid']} ({record.get('command', '?')[:80]})"


_VERIFIED: set[tuple[Any, ...]] = set()


def _identity(file: Path, digest: str) -> tuple[Any, ...]:
    """What changes whenever a file's bytes may have: its inode and its change time (which, unlike the
    modification time, no program can set back)."""
    stat = file.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest)


def intact(file: Path, digest: str) -> bool:
    """Whether `file` has this sha256. A file hashed earlier in this process (when written, or read) and unchanged
    since is not hashed again, so a run hashes each file once however many stages read it."""
    try:
        key = _identity(file, digest)
    except OSError:
        return False
    if key in _VERIFIED:
        return True
    if not file.is_file() or sha256_file(file) != digest:
        return False
    _VERIFIED.add(key)
    return True


def require_intact(
    folder: Path, digests: dict[str, str], listed_in: str, remedy: str, only: Callable[[str], bool] | None = None
) -> None:
    """Raise ArtifactError naming the first file (relative names in `digests`) that is missing or whose bytes
    differ from its recorded sha256: a flipped bit is caught when the file is next read, before anything uses it."""
    for rel, digest in sorted(digests.items()):
        if only is not None and not only(rel):
            continue
        file = folder / rel
        if not file.is_file():
            raise ArtifactError(f"{file}: missing, though {listed_in} lists it; {remedy}")
        if not intact(file, digest):
            raise ArtifactError(
                f"{file}: its bytes differ from the sha256 in {listed_in} (changed or corrupted since it was "
                f"written); {remedy}"
            )


def integrity(folder: Path) -> list[str]:
    """Files of an artifact or release that do not match its manifest: changed, missing or not listed."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{folder}: no {MANIFEST}; not a clearlm release")
    outputs = json.loads(manifest_path.read_text())["outputs"]
    problems = [f"{rel}: {'missing' if not (folder / rel).is_file() else 'content differs from manifest'}"
                for rel, digest in outputs.items()
                if not intact(folder / rel, digest)]  # fmt: skip
    listed = set(outputs)
    problems += [f"{p.relative_to(folder).as_posix()}: not in manifest" for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in listed]  # fmt: skip
    return problems
