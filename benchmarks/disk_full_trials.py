"""A full disk at every write site: does the command end in one line naming the path and the space, keep
what was finished intact, and, once space is freed, continue with `--resume` to what an uninterrupted run makes?

The runs write into a size-limited tmpfs (Linux, needs the right to mount, e.g. root). One uninterrupted run
in it measures the space each stage's artifact takes. Each trial empties the file system, limits it to the
space of the stages before a chosen one plus a random part of that stage's own (so the disk fills inside that
stage, at whichever write crosses the limit), and runs the command that ends soonest after that stage
(`clearlm data`, `train`, `sft`, `dpo`, or `run` for eval and the release). It checks:
- the command exits with code 2 and one line (no traceback) that names a path under the work directory;
- every artifact directory without `.partial` is complete (its files match its manifest);
- after the limit is raised, the same command with `--resume` finishes, resumes a training stage from its
  checkpoint when one was left, and every stage it built equals the uninterrupted run's bytes.

    python benchmarks/disk_full_trials.py [--trials 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kill_trials import SMALL, Run, after_resume, checkpoints_left, incomplete_artifacts

from clearlm.release.compare import stage_outputs
from clearlm.stages import names

# the command that fills the disk inside a stage (any other stage: `run`)
COMMANDS = {"data": "data", "tokenizer": "train", "shards": "train", "train": "train", "sft": "sft", "dpo": "dpo"}
LAST = {"data": "data", "train": "train", "sft": "sft", "dpo": "dpo", "run": "release"}
ROOM = "1G"
SLACK = 4 << 10  # the page of the lock file held while building


def can_mount() -> bool:
    with tempfile.TemporaryDirectory() as folder:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", folder], capture_output=True).returncode:
            return False
        subprocess.run(["umount", folder], check=True)
        return True


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[Path]:
    """A tmpfs mounted at `folder` for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ROOM}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def limit(folder: Path, size: int | str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def allocated(path: Path) -> int:
    """Bytes a file or folder takes on a tmpfs: whole 4 KiB pages of each file's data (computed from the sizes,
    not from `st_blocks`, which on the reference's own file system depends on when it writes back)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


def stage_space(workdir: Path) -> dict[str, int]:
    """The space each stage's artifact takes, in stage order."""
    found = {d.name.rsplit("-", 1)[0]: allocated(d) for d in (workdir / "artifacts").iterdir() if d.is_dir()}
    return {s: found[s] for s in names() if s in found}


def fill_level(space: dict[str, int], stage: str, fraction: float) -> int:
    """A size limit `fraction` of the way into `stage`'s own space (whole pages, at least one short of it)."""
    order = list(space)
    before = sum(space[s] for s in order[: order.index(stage)])
    own = min(int(fraction * space[stage]) // 4096 * 4096, space[stage] - 4096)
    return before + own + SLACK


def command(recipe: str, sets: list[str], workdir: Path, verb: str, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "clearlm", verb, recipe, "--workdir", str(workdir)]
    return args + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume and verb != "data" else [])


def trial(
    recipe: str, sets: list[str], disk: Path, stage: str, fraction: float, space: dict[str, int],
    reference: dict[str, Any], env: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fill the disk `fraction` of the way into `stage`, then free space and resume; what happened."""
    empty(disk)
    size = fill_level(space, stage, fraction)
    limit(disk, size)
    workdir, verb = disk / "work", COMMANDS.get(stage, "run")
    run = Run(command(recipe, sets, workdir, verb), env)
    code = run.finish()
    hit = run.stage_at_end()
    said = [line for _, line in run.lines if line.strip()]
    record: dict[str, Any] = {"stage": stage, "fraction": round(fraction, 3), "limit": size, "hit": hit,
                              "message": said[-1] if said else ""}  # fmt: skip
    problems = []
    if code == 0:
        record["hit"] = "fit"
    elif code != 2 or any("Traceback" in line for line in said) or not said[-1].startswith("error: "):
        problems.append(f"exit code {code}, ending: {' | '.join(said[-3:])}")
    elif str(disk) not in said[-1] or "free" not in said[-1]:
        problems.append(f"the error names no path under the work directory or no space: {said[-1]}")
    problems += [f"looks complete but is not: {p}" for p in incomplete_artifacts(workdir)]
    left = checkpoints_left(workdir)
    limit(disk, ROOM)
    resumed = Run(command(recipe, sets, workdir, verb, resume=True), env)
    if resumed.finish() != 0:
        return {**record, "problems": [*problems, f"resume failed: {' | '.join(x for _, x in resumed.lines[-3:])}"]}
    order = list(reference)
    built = {s: reference[s] for s in order[: order.index(LAST[verb]) + 1]}
    return {**record, "problems": problems + after_resume(workdir, left, resumed, built)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="quickstart", help="recipe file or built-in name")
    ap.add_argument(
        "--set", dest="sets", action="append", help="recipe overrides (default: the kill trials' small run)"
    )
    ap.add_argument("--mount", type=Path, default=None, help="where to mount the tmpfs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write every trial's record here")
    args = ap.parse_args()
    if not can_mount():
        sys.exit("mounting a tmpfs is not permitted here (run as root on Linux)")
    sets, rng = args.sets or SMALL, random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch, small_disk(args.mount or Path(scratch) / "disk") as disk:
        env = {"XDG_CACHE_HOME": str(Path(scratch) / "cache")}  # outside the small disk
        ref = Run([*command(args.recipe, sets, disk / "work", "run")], env)
        if ref.finish() != 0:
            sys.exit("the reference run failed:\n" + "\n".join(line for _, line in ref.lines[-20:]))
        reference, space = stage_outputs(disk / "work"), stage_space(disk / "work")
        print("space per stage: " + ", ".join(f"{s} {n / 2**20:.1f} MiB" for s, n in space.items()), flush=True)
        records, order = [], list(space)
        for k in range(args.trials):
            stage = order[k % len(order)] if k < len(order) else rng.choice(order)
            record = trial(args.recipe, sets, disk, stage, rng.uniform(0.05, 0.95), space, reference, env)
            records.append(record)
            verdict = "ok" if not record["problems"] else "; ".join(record["problems"])
            print(f"trial {k + 1:3d}: {stage:9s} at {record['fraction']:.2f} (hit: {record['hit']:9s}): {verdict}"
                  f"\n           {record['message'][:200]}", flush=True)  # fmt: skip
    failed = [r for r in records if r["problems"]]
    hits = Counter(r["hit"] for r in records)
    print(f"\n{len(records) - len(failed)}/{len(records)} trials ok; disk filled in: "
          + ", ".join(f"{s} {hits[s]}" for s in [*names(), "fit"] if hits[s]))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
