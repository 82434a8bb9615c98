"""kill -9 at random moments: does `clearlm run --resume` always finish with what an uninterrupted run makes?

One uninterrupted `clearlm run` of a small recipe with every stage is the reference; it also times each stage.
Each trial starts the same run in a fresh work directory, kills its whole process group with SIGKILL at a
random moment (a stage drawn at random, then a moment inside it, so that short stages are hit too), then runs
`clearlm run --resume` to the end. After every trial it checks:
- every artifact directory without `.partial` is complete (its manifest lists every file with its digest);
- a stage that had a checkpoint when it was killed resumes from it (it is never restarted from scratch);
- every stage's outputs equal the reference's (files with wall-clock fields compared without them), and the
  release's files too, except those that record when they were made; a difference is reported with the first
  stage that differs and, for a training stage, the first step whose log record differs.

    python benchmarks/kill_trials.py [--trials 50] [--seed 0] [--workdir /tmp/kill-trials]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from clearlm.artifacts import MANIFEST, Artifact, check_outputs

# The small recipe: the built-in quickstart, shrunk, with frequent checkpoints in every training stage.
SMALL = [
    "train.max_steps=40",
    "model.n_layers=2",
    "model.d_model=96",
    "model.n_heads=4",
    "train.checkpoint_interval=10",
    "train.eval_interval=20",
    "sft.builtin_examples=48",
    "sft.epochs=1",
    "sft.checkpoint_interval=2",
    "dpo.builtin_pairs=24",
    "dpo.checkpoint_interval=2",
    "eval.limit=20",
]
STAGES = ("data", "tokenizer", "shards", "train", "sft", "dpo", "eval", "release")
CHECKPOINTED = ("train", "sft", "dpo")
_TIME_KEYS = {"seconds", "tokens_per_s", "mfu", "train_seconds", "elapsed", "created"}
# Release files that print timings (throughput, seconds) or the day the run was made; all they describe is
# compared in the stages themselves. `lineage.json` is compared without its creation times.
_RELEASE_TIMED = ("README.md", "report.html", "mot.yml")


def _without_times(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in _TIME_KEYS}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def _timed(rel: str) -> bool:
    """Files that hold wall-clock times: compared without them, so their digests differ between runs."""
    return rel.endswith(("log.jsonl", "state.json"))


def _content(path: Path, digest: str) -> Any:
    """A file's digest, or, for the files that hold wall-clock times, its content without them (as text, so
    that the order of keys still counts)."""
    if path.name.endswith("log.jsonl"):
        return [_without_times(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if path.name == "state.json":
        return json.dumps(_without_times(json.loads(path.read_text())))
    if path.name == "lineage.json":  # when each stage was made, and the digests of its timed files
        lineage = {stage: {key: {rel: d for rel, d in value.items() if not _timed(rel)} if key == "outputs" else value
                           for key, value in entry.items() if key != "created"}
                   for stage, entry in json.loads(path.read_text()).items()}  # fmt: skip
        return json.dumps(lineage)
    return digest


def stage_outputs(workdir: Path) -> dict[str, dict[str, Any]]:
    """Per finished stage, what must equal the reference: every output file (see `_content`)."""
    found: dict[str, dict[str, Any]] = {}
    for art in sorted((workdir / "artifacts").iterdir()) if (workdir / "artifacts").is_dir() else []:
        kind = art.name.rsplit("-", 1)[0]
        if art.name.endswith(".partial") or kind not in STAGES or not (art / MANIFEST).is_file():
            continue
        outputs = json.loads((art / MANIFEST).read_text())["outputs"]
        found[kind] = {rel: _content(art / rel, digest) for rel, digest in outputs.items()
                       if kind != "release" or rel not in _RELEASE_TIMED}  # fmt: skip
    return found


def first_difference(reference: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> str | None:
    """The first stage whose outputs differ, with its files and (training stages) the first differing step."""
    for stage in STAGES:
        ours, theirs = reference.get(stage, {}), other.get(stage)
        if theirs is None:
            return f"{stage}: missing"
        differ = sorted(rel for rel in ours.keys() | theirs.keys() if ours.get(rel) != theirs.get(rel))
        if not differ:
            continue
        where = ""
        log = next((rel for rel in differ if rel.endswith("log.jsonl")), None)
        if log is not None and isinstance(ours.get(log), list) and isinstance(theirs.get(log), list):
            step = next((a.get("step") for a, b in zip(ours[log], theirs[log], strict=False) if a != b), None)
            where = f" from step {step}" if step is not None else " (log length)"
        return f"{stage}{where}: {', '.join(differ[:4])}"
    return None


def incomplete_artifacts(workdir: Path) -> list[str]:
    """Artifact directories that look finished (no `.partial`) but are not: no manifest, or a file that is
    missing or differs from its digest."""
    bad = []
    for art in sorted((workdir / "artifacts").iterdir()) if (workdir / "artifacts").is_dir() else []:
        if art.name.endswith(".partial"):
            continue
        try:
            manifest = json.loads((art / MANIFEST).read_text())
        except (OSError, ValueError):
            bad.append(f"{art.name}: no readable manifest")
            continue
        if problems := check_outputs(Artifact(manifest["kind"], manifest["digest"], art, manifest)):
            bad.append(f"{art.name}: {', '.join(problems[:3])}")
    return bad


def checkpoints_left(workdir: Path) -> dict[str, str]:
    """Per training stage still in progress, the newest checkpoint a resume can continue from."""
    found = {}
    for partial in (workdir / "artifacts").glob("*.partial") if (workdir / "artifacts").is_dir() else []:
        kind = partial.name.rsplit("-", 1)[0]
        ready = sorted(
            p.name
            for p in (partial / "checkpoints").glob("step-*")
            if not p.name.endswith(".tmp") and (p / "optimizer").is_dir() and (p / "state.json").is_file()
        )
        if kind in CHECKPOINTED and ready:
            found[kind] = ready[-1]
    return found


class Run:
    """`clearlm run` in its own process group, its output lines collected with the time each arrived."""

    def __init__(self, command: list[str]) -> None:
        self.started = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "COLUMNS": "400"})  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip()))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it had already finished
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()

    def finish(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        return code

    def stage_at(self, moment: float) -> str:
        """The stage being built at `moment` (seconds after start): 'start-up' before the first, 'finished' after."""
        current = "start-up"
        for at, line in self.lines:
            if at > moment:
                break
            head = line.split(":", 1)[0]
            if head in STAGES and line.endswith(": building"):
                current = head
            elif head in STAGES and ": done in" in line and current == head:
                current = f"after {head}"
        return "finished" if self.proc.returncode == 0 and moment >= self.lines[-1][0] else current

    def windows(self) -> dict[str, tuple[float, float]]:
        """(start, end) of each stage, seconds after the process started."""
        starts, spans = {}, {}
        for at, line in self.lines:
            head = line.split(":", 1)[0]
            if line.endswith(": building") and head in STAGES:
                starts[head] = at
            elif ": done in" in line and head in starts:
                spans[head] = (starts[head], at)
        return spans


def command(recipe: str, sets: list[str], workdir: Path, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "clearlm", "run", recipe, "--workdir", str(workdir)]
    return args + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])


def trial(recipe: str, sets: list[str], workdir: Path, moment: float, reference: dict[str, Any]) -> dict[str, Any]:
    """One kill at `moment` seconds and a resume; what was hit, and everything that went wrong."""
    shutil.rmtree(workdir, ignore_errors=True)
    run = Run(command(recipe, sets, workdir))
    time.sleep(moment)
    run.kill()
    hit = run.stage_at(moment)
    problems = [f"looks complete but is not: {p}" for p in incomplete_artifacts(workdir)]
    left = checkpoints_left(workdir)
    resumed = Run(command(recipe, sets, workdir, resume=True))
    if resumed.finish() != 0:
        tail = " | ".join(line for _, line in resumed.lines[-3:])
        return {"moment": round(moment, 2), "hit": hit, "problems": [*problems, f"resume failed: {tail}"]}
    said = "\n".join(line for _, line in resumed.lines)
    problems += [f"{stage}: restarted from scratch though {ckpt} existed" for stage, ckpt in left.items()
                 if f"{stage}: resuming from {ckpt}" not in said]  # fmt: skip
    problems += [f"after resume, looks complete but is not: {p}" for p in incomplete_artifacts(workdir)]
    if (difference := first_difference(reference, stage_outputs(workdir))) is not None:
        problems.append(f"differs from the uninterrupted run: {difference}")
    return {"moment": round(moment, 2), "hit": hit, "checkpoints": left, "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="quickstart", help="recipe file or built-in name")
    ap.add_argument("--set", dest="sets", action="append", help="recipe overrides (default: the issue's small run)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--json", type=Path, default=None, help="also write every trial's record here")
    args = ap.parse_args()
    sets = args.sets or SMALL
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kill-trials-"))
    rng = random.Random(args.seed)

    ref = Run(command(args.recipe, sets, root / "reference"))
    if ref.finish() != 0:
        sys.exit("the reference run failed:\n" + "\n".join(line for _, line in ref.lines[-20:]))
    reference, windows = stage_outputs(root / "reference"), ref.windows()
    print(f"reference run: {ref.lines[-1][0]:.1f} s; stages: "
          + ", ".join(f"{s} {b - a:.1f} s" for s, (a, b) in windows.items()), flush=True)  # fmt: skip

    records, hits = [], Counter()
    for k in range(args.trials):
        start, end = windows[rng.choice(sorted(windows))]
        record = trial(args.recipe, sets, root / "trial", rng.uniform(start, end), reference)
        hits[record["hit"]] += 1
        records.append(record)
        status = "ok" if not record["problems"] else "; ".join(record["problems"])
        print(f"trial {k + 1:3d}: killed at {record['moment']:6.2f} s in {record['hit']:<14} "
              f"checkpoints {record.get('checkpoints') or '-'}: {status}", flush=True)  # fmt: skip
    failed = [r for r in records if r["problems"]]
    print(f"\n{len(records)} trials, {len(records) - len(failed)} ok, {len(failed)} with a problem")
    print("kill points per stage: " + ", ".join(f"{s} {n}" for s, n in sorted(hits.items())))
    resumed = Counter(s for r in records for s in r.get("checkpoints", {}))
    print("resumed from a checkpoint: " + (", ".join(f"{s} {n}" for s, n in sorted(resumed.items())) or "none"))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
