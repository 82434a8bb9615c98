"""kill -9 at random moments: does `clearlm run --resume` always finish with what an uninterrupted run makes?

One uninterrupted `clearlm run` of a small recipe with every stage is the reference (a second one must agree
with it, or no kill can be judged); it also times each stage.
Each trial starts the same run in a fresh work directory, picks a stage at random, waits until the run says it
is building that stage, waits a random part of the stage's reference duration and kills the whole process
group with SIGKILL; then it runs `clearlm run --resume` to the end. After every trial it checks:
- every artifact directory without `.partial` is complete (its manifest lists every file with its digest);
- a stage that had a checkpoint when it was killed resumes from it (it is never restarted from scratch);
- every stage's outputs equal the reference's (`clearlm.release.compare`: files with wall-clock fields
  compared without them, the release's too); a difference is reported with the first stage that differs
  and, for a training stage, the first step whose log record differs.

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

from clearlm.artifacts import MANIFEST, integrity
from clearlm.release.compare import first_difference, stage_outputs
from clearlm.stages import names, spec
from clearlm.train.checkpoint_files import resumable, shown

STAGES = tuple(names())

# The small recipe: the built-in quickstart, shrunk, with frequent checkpoints in every training stage.
SMALL = ["train.max_steps=40", "model.n_layers=2", "model.d_model=96", "model.n_heads=4",
         "train.checkpoint_interval=10", "train.eval_interval=20", "sft.builtin_examples=48", "sft.epochs=1",
         "sft.checkpoint_interval=2", "dpo.builtin_pairs=24", "dpo.checkpoint_interval=2", "eval.limit=20",
         "midtrain.max_steps=6", "midtrain.checkpoint_interval=2", "rlvr.max_steps=4",
         "rlvr.checkpoint_interval=2"]  # fmt: skip
CHECKPOINTED = tuple(s for s in STAGES if spec(s).resumes == "checkpoints")


def incomplete_artifacts(workdir: Path) -> list[str]:
    """Artifact directories that look finished (no `.partial`) but are not: no manifest, or a file that is
    missing or differs from its digest."""
    bad = []
    for art in sorted((workdir / "artifacts").iterdir()) if (workdir / "artifacts").is_dir() else []:
        if art.name.endswith(".partial") or art.name.startswith("."):  # work in progress; the locks
            continue
        try:
            json.loads((art / MANIFEST).read_text())
        except (OSError, ValueError):
            bad.append(f"{art.name}: no readable manifest")
            continue
        if problems := integrity(art):
            bad.append(f"{art.name}: {', '.join(problems[:3])}")
    return bad


def checkpoints_left(workdir: Path) -> dict[str, str]:
    """Per training stage still in progress, the checkpoint a resume must continue from."""
    found = {}
    for partial in sorted((workdir / "artifacts").glob("*.partial")) if (workdir / "artifacts").is_dir() else []:
        kind = partial.name.rsplit("-", 1)[0]
        if kind in CHECKPOINTED and (ckpt := resumable(partial, spec(kind).resume_from)) is not None:
            found[kind] = shown(partial, ckpt)
    return found


class Run:
    """`clearlm run` in its own process group, its output lines collected with the time each arrived."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.started = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        env = {**os.environ, "COLUMNS": "400", **(env or {})}  # one line per message
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env)  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip()))

    def wait_for(self, text: str, timeout: float = 600) -> bool:
        """Block until a line holding `text` arrives; False if the run ended (or `timeout` passed) first."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if any(text in line for _, line in list(self.lines)):
                return True
            if self.proc.poll() is not None:
                self.reader.join()
                return any(text in line for _, line in self.lines)
            time.sleep(0.01)
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it had already finished
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()

    def finish(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        return code

    def stage_at_end(self) -> str:
        """The stage that was being built when the run stopped, or 'finished'."""
        if self.proc.returncode == 0:
            return "finished"
        current = "start-up"
        for _, line in self.lines:
            head = line.split(":", 1)[0]
            if head in STAGES and line.endswith(": building"):
                current = head
            elif head == current and ": done in" in line:
                current = f"after {head}"
        return current

    def windows(self) -> dict[str, float]:
        """How long each stage took, from its 'building' line to its 'done' line."""
        starts, spans = {}, {}
        for at, line in self.lines:
            head = line.split(":", 1)[0]
            if line.endswith(": building") and head in STAGES:
                starts[head] = at
            elif ": done in" in line and head in starts:
                spans[head] = at - starts[head]
        return spans


def command(recipe: str, sets: list[str], workdir: Path, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "clearlm", "run", recipe, "--workdir", str(workdir)]
    return args + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])


def _first_checkpoint(workdir: Path, stage: str, run: Run) -> None:
    """Block until a checkpoint of `stage` is complete on disk (or the run ended)."""
    pattern = f"{stage}-*.partial/{spec(stage).resume_from}/step-{'[0-9]' * 7}/state.json"  # not a .tmp one
    while run.proc.poll() is None and not any((workdir / "artifacts").glob(pattern)):
        time.sleep(0.005)


def trial(
    recipe: str, sets: list[str], workdir: Path, stage: str, delay: float, reference: dict[str, Any],
    env: dict[str, str] | None = None, after_checkpoint: bool = False, earlier_from: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Kill a run `delay` seconds after it starts building `stage` (or, with `after_checkpoint`, after that
    stage's first checkpoint is written), resume it; what was hit and what went wrong. With `earlier_from` (a
    finished work directory of the same run), the stages before `stage` are copied from it rather than built."""
    shutil.rmtree(workdir, ignore_errors=True)
    if earlier_from is not None:
        earlier = STAGES[: STAGES.index(stage)]
        for art in (earlier_from / "artifacts").iterdir():
            if art.name.rsplit("-", 1)[0] in earlier:
                shutil.copytree(art, workdir / "artifacts" / art.name)
    run = Run(command(recipe, sets, workdir), env)
    if run.wait_for(f"{stage}: building"):
        if after_checkpoint:
            _first_checkpoint(workdir, stage, run)
        time.sleep(delay)
    run.kill()
    hit = run.stage_at_end()
    problems = [f"looks complete but is not: {p}" for p in incomplete_artifacts(workdir)]
    left = checkpoints_left(workdir)
    resumed = Run(command(recipe, sets, workdir, resume=True), env)
    record: dict[str, Any] = {"stage": stage, "delay": round(delay, 2), "hit": hit, "checkpoints": left}
    if resumed.finish() != 0:
        tail = " | ".join(line for _, line in resumed.lines[-3:])
        return {**record, "problems": [*problems, f"resume failed: {tail}"]}
    return {**record, "problems": problems + after_resume(workdir, left, resumed, reference)}


def after_resume(workdir: Path, left: dict[str, str], resumed: Run, reference: dict[str, Any]) -> list[str]:
    """What a finished resume got wrong: a stage restarted though it had a checkpoint (`left`), an artifact that
    looks complete but is not, a stage whose outputs differ from `reference`'s."""
    said = "\n".join(line for _, line in resumed.lines)
    problems = [f"{kind}: restarted from scratch though {ckpt} existed" for kind, ckpt in left.items()
                if f"{kind}: resuming from {ckpt}" not in said]  # fmt: skip
    problems += [f"after resume, looks complete but is not: {p}" for p in incomplete_artifacts(workdir)]
    if (difference := first_difference(reference, stage_outputs(workdir))) is not None:
        problems.append(f"differs from the uninterrupted run: {difference}")
    return problems


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

    refs = []
    for k in (1, 2):
        refs.append(ref := Run(command(args.recipe, sets, root / f"reference-{k}")))
        if ref.finish() != 0:
            sys.exit("a reference run failed:\n" + "\n".join(line for _, line in ref.lines[-20:]))
    reference, windows = stage_outputs(root / "reference-1"), refs[0].windows()
    # two uninterrupted runs must agree before any kill is judged against them
    unreproducible = first_difference(reference, stage_outputs(root / "reference-2"))
    print(f"reference run: {refs[0].lines[-1][0]:.1f} s; stages: "
          + ", ".join(f"{s} {d:.1f} s" for s, d in windows.items())
          + f"; a second uninterrupted run {'differs: ' + unreproducible if unreproducible else 'agrees'}",
          flush=True)  # fmt: skip

    records, hits = [], Counter()
    for k in range(args.trials):
        stage = rng.choice(sorted(windows))
        record = trial(args.recipe, sets, root / "trial", stage, rng.uniform(0, windows[stage]), reference)
        hits[record["hit"]] += 1
        records.append(record)
        status = "ok" if not record["problems"] else "; ".join(record["problems"])
        print(f"trial {k + 1:3d}: killed {record['delay']:5.2f} s into {stage:<9} (hit: {record['hit']:<15}) "
              f"checkpoints {record['checkpoints'] or '-'}: {status}", flush=True)  # fmt: skip
    failed = [r for r in records if r["problems"]]
    print(
        f"\n{len(records)} trials, {len(records) - len(failed)} ok, {len(failed)} with a problem"
        + ("; the two uninterrupted runs differ" if unreproducible else "")
    )
    print("kill points per stage: " + ", ".join(f"{s} {n}" for s, n in sorted(hits.items())))
    resumed = Counter(s for r in records for s in r["checkpoints"])
    print("resumed from a checkpoint: " + (", ".join(f"{s} {n}" for s, n in sorted(resumed.items())) or "none"))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    sys.exit(1 if failed or unreproducible else 0)


if __name__ == "__main__":
    main()
