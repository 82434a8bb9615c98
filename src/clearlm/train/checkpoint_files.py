"""Where a checkpoint's files are: what resume, a disk-full message and `run --plan` look for, without torch."""

from __future__ import annotations

from pathlib import Path

OPTIMIZER, RNG, STATE, CHECKSUMS = "optimizer", "rng.safetensors", "state.json", "checksums.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (never a half-written `.tmp` one)."""
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE).exists())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that can be resumed from (has optimizer state)."""
    done = [p for p in checkpoints(root) if (p / OPTIMIZER).exists()]
    return done[-1] if done else None


def resumable(partial: Path, pattern: str = "checkpoints") -> Path | None:
    """The checkpoint a stage's interrupted build resumes from: the most recently written resumable one in the
    folders matching `pattern` (a stage with several runs, like mid-training's ingredients, has one folder each)."""
    found = [ckpt for folder in partial.glob(pattern) if (ckpt := latest_checkpoint(folder)) is not None]
    return max(found, key=lambda ckpt: (ckpt / STATE).stat().st_mtime_ns, default=None)


def shown(partial: Path, ckpt: Path) -> str:
    """How a message names a checkpoint: `step-0000040`, or `ingredients/seed-2/.../step-0000004`."""
    return ckpt.name if ckpt.parent == partial / "checkpoints" else ckpt.relative_to(partial).as_posix()
