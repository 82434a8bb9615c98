"""`clearlm verify`: check a release against its manifest, re-run its recipe, compare every stage.

1. Integrity: every file the release's `manifest.json` lists must have its recorded sha256, and
   no file may be missing or unlisted; an edited or corrupted file is named.
2. Inputs: the raw inputs' digests (source files, the built-in corpus) must equal those recorded.
3. Reproduction: the recipe in `recipe.toml` runs again in a scratch directory, and each stage's
   outputs (data, tokenizer, shards, training, evaluation) are compared with the sha256s recorded in
   `lineage.json`. Files that hold wall-clock times (the training log, checkpoint state) are
   compared without those fields, against the copies in the release where there is one.
The first stage that differs is reported with its files, the largest weight difference, the first
training step that differs, and the likely cause (library versions, thread counts or math-library modes that
changed). A difference no larger than float rounding (the runs part by at most `ROUNDING`, relatively, at
their first differing step or result) is reported as such, apart from a real difference.
Each stage re-runs with the thread count its artifact recorded: a sum split over another number of threads
rounds differently.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from itertools import zip_longest
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from clearlm.artifacts import integrity
from clearlm.numerics import stage_threads
from clearlm.pipeline import Pipeline
from clearlm.recipe import LoadedRecipe, Recipe, load_recipe, without_guards
from clearlm.release.compare import jsonl
from clearlm.stages import Reporter, final_model, names, spec
from clearlm.world import shared_path, world

# The largest relative difference counted as float rounding where two runs first part: float32 carries ~6e-8,
# and a step's sums and a result's means gather a few hundred such roundings. Any change of data, settings
# or code moves a loss, a learning rate or a score by far more.
ROUNDING = 1e-5


@dataclass
class Verdict:
    reproduced: bool
    lines: list[str] = field(default_factory=list)
    stage: str | None = None
    files: list[str] = field(default_factory=list)
    max_weight_diff: float | None = None
    rounding: bool = False  # the first difference is no larger than float rounding


def _weight_diff(release_weights: Path, rerun_weights: Path) -> tuple[float, float]:
    """Largest absolute difference between the release's weights (transformers' names) and the re-run's, and
    the largest absolute weight (its scale)."""
    left = {k.removeprefix("model."): v for k, v in load_file(release_weights).items()}
    right = {k.removeprefix("model."): v for k, v in load_file(rerun_weights).items()}
    common = [k for k in left.keys() & right.keys() if left[k].shape == right[k].shape]
    diff = max(((left[k].float() - right[k].float()).abs().max().item() for k in common), default=math.inf)
    return diff, max((left[k].float().abs().max().item() for k in common), default=0.0)


def _relative_difference(a: Any, b: Any) -> float:
    """The largest relative difference between the numbers of two JSON values; inf where they differ otherwise
    (other keys, lengths or text)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b or (a != a and b != b):  # equal, or both NaN
            return 0.0
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        return abs(a - b) / max(abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((_relative_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max(map(_relative_difference, a, b), default=0.0)
    return 0.0 if a == b else math.inf


def _values(path: Path) -> Any:
    """A JSON or JSON-lines file's content, for a relative comparison of its numbers."""
    return jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text())


def _divergence(stage: str, release: Path, rerun: Any) -> tuple[int | None, float]:
    """Where the re-run first parts from the release, and by how much (relative): the first differing step of
    a training log, or the JSON results the release keeps a copy of; (None, 0.0) when those agree."""
    if (log := spec(stage).log) is not None:
        for ours, theirs in zip_longest(jsonl(release / log), jsonl(rerun.path / "log.jsonl")):
            if ours != theirs:
                return (ours or theirs).get("step"), _relative_difference(ours, theirs)
        return None, 0.0
    copies = [(release / target, rerun.path / rel) for rel, target in spec(stage).release.items()
              if (release / target).is_file() and (rerun.path / rel).is_file()]  # fmt: skip
    if not copies:
        return None, math.inf  # data, tokenizer and shards hold no float results: any difference is real
    return None, max(_relative_difference(_values(a), _values(b)) for a, b in copies)


def _release_copy(folder: Path, stage: str, recipe: Recipe) -> Path | None:
    """The release's copy of a stage's final weights: the model itself for the released stage, the last
    checkpoint for a stage whose checkpoints the release keeps; None for a model a later stage replaced."""
    if stage == final_model(recipe):
        return folder / "model.safetensors"
    if (kept := spec(stage).checkpoints) is not None:
        steps = sorted(folder.glob(f"{kept}/step-*/model.safetensors"), key=lambda p: int(p.parent.name[5:]))
        return steps[-1] if steps else None
    return None


def _compare_stage(stage: str, recorded: dict[str, Any], rerun: Any, release: Path) -> tuple[list[str], list[str]]:
    """(differing files, files compared without their wall-clock fields) for one stage.

    The training log is compared with the release's copy, fields holding times left out; checkpoint
    state files hold the elapsed time and have no copy in the release, so they are not compared, nor the
    checksums that include them (the checkpoints' weights and optimizer state are)."""
    differ, timed = [], []
    produced = rerun.manifest["outputs"]
    for rel, digest in recorded["outputs"].items():
        if produced.get(rel) == digest:
            continue
        if any(fnmatch(rel, pattern) for pattern in spec(stage).timed):
            if rel == "log.jsonl":
                timed.append(rel)
                if jsonl(release / spec(stage).log) != jsonl(rerun.path / rel):
                    differ.append(rel)
            continue
        differ.append(rel)
    return differ + [rel for rel in produced if rel not in recorded["outputs"]], timed


def _environment_changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What the release's stage recorded (library versions, thread count, MKL mode and code path) that differs
    here; what it did not record is left out, except an MKL mode that releases made before clearlm set one lack."""
    changes = [f"{k} {then[k]} (release) vs {now.get(k)} (here)" for k in sorted(then)
               if k not in ("platform", "cpu_count") and then[k] != now.get(k)]  # fmt: skip
    if "mkl_cbwr" in now and "mkl_cbwr" not in then:
        changes.append("the release recorded no MKL mode (made before clearlm chose one): MKL_CBWR=BRANCH_OFF in "
                       "the environment re-runs it in MKL's default mode")  # fmt: skip
    return changes


def _recorded_threads(lineage: dict[str, Any], stages: list[str]) -> dict[str, int]:
    """The thread count each stage recorded (releases made before clearlm recorded it have none)."""
    return {s: env["threads"] for s in stages if "threads" in (env := lineage[s].get("environment") or {})}


def _changed_inputs(loaded: LoadedRecipe, lineage: dict[str, Any], stages: list[str]) -> Verdict | None:
    """A stage's files from outside the work dir (corpus sources, post-training data, a base model folder) that
    differ here from what the release recorded: the re-run would not be of the same inputs."""
    for stage in stages:
        recorded, identity = lineage[stage].get("sources"), spec(stage).identity
        if recorded is None or identity is None:
            continue
        try:
            now: Any = identity(loaded)
        except OSError as err:
            now = f"{err.filename}: {err.strerror}"
        if json.loads(json.dumps(now)) != recorded:
            return Verdict(False, [f"{stage} inputs differ from those recorded: the files it reads are not the same "
                                   f"(recorded {json.dumps(recorded)[:200]}; here {json.dumps(now)[:200]}); pass "
                                   "--base-dir to point at the recipe's files"], stage="inputs")  # fmt: skip
    return None


def verify_release(
    folder: Path, base_dir: Path | None = None, workdir: Path | None = None, reporter: Reporter | None = None
) -> Verdict:
    folder = Path(folder).resolve()
    problems = integrity(folder)
    if problems:
        return Verdict(False, [f"tampered: {p}" for p in problems], stage="release",
                       files=[p.split(":")[0] for p in problems])  # fmt: skip
    lineage = json.loads((folder / "lineage.json").read_text())
    loaded = without_guards(load_recipe(folder / "recipe.toml"))  # the release was made: its re-run must not stop
    if base_dir is not None:
        loaded = loaded.model_copy(update={"base_dir": Path(base_dir).resolve()})
    stages = [stage for stage in names() if stage in lineage and stage != "release"]
    if (changed := _changed_inputs(loaded, lineage, stages)) is not None:
        return changed
    w = world()
    with tempfile.TemporaryDirectory(prefix="clearlm-verify-", dir=workdir) as own:
        scratch = shared_path(own, w)  # under torchrun every rank re-runs training in rank 0's folder
        pipe = Pipeline(loaded, Path(scratch), reporter, threads=_recorded_threads(lineage, stages))
        if not w.main:  # the other ranks only take part in the stages that run on every rank
            pipe.run("release")
            return Verdict(True, [])
        own = loaded.recipe.train.threads
        pinned = {s: n for s, n in pipe.threads.items() if n != stage_threads(own, lineage[s].get("world_size", 1))}
        if pinned:
            pipe.reporter.note(f"re-running with the thread counts the release recorded, not this machine's: {pinned}")
        rerun = {stage: pipe.require(stage) for stage in stages}
        lines = []
        for stage in stages:
            differ, timed = _compare_stage(stage, lineage[stage], rerun[stage], folder)
            if not differ:
                skipped = [r for r in lineage[stage]["outputs"] if r.endswith("state.json")]
                note = f"; {', '.join(timed)} without wall-clock times" if timed else ""
                note += f"; {len(skipped)} checkpoint state files (elapsed time) not compared" if skipped else ""
                lines.append(f"{stage}: reproduced bit-for-bit, {len(lineage[stage]['outputs'])} files{note}")
                continue
            verdict = Verdict(False, lines, stage=stage, files=differ)
            step, relative = _divergence(stage, folder, rerun[stage])
            details = [f"first at step {step}"] if step is not None else []
            details += [f"largest relative difference there {relative:.2g}"] if 0 < relative < math.inf else []
            verdict.rounding = 0 < relative <= ROUNDING
            if "model.safetensors" in differ and (copy := _release_copy(folder, stage, loaded.recipe)) is not None:
                verdict.max_weight_diff, scale = _weight_diff(copy, rerun[stage].path / "model.safetensors")
                details.insert(0, f"max |Δ| {verdict.max_weight_diff:.3g} in the weights ({copy.relative_to(folder)})")
                if relative == 0:  # the log agrees to the last step: only that step's update can differ
                    verdict.rounding = 0 < verdict.max_weight_diff <= ROUNDING * scale
            elif "model.safetensors" in differ:
                details.append(f"the release holds no copy of the {stage} weights to measure the difference")
            kind = "differs at float-rounding level" if verdict.rounding else "differs"
            lines.append(f"{stage}: {kind} ({'; '.join(details)}): {', '.join(differ[:8])}" if details
                         else f"{stage}: {kind}: {', '.join(differ[:8])}")  # fmt: skip
            recorded_env = lineage[stage].get("environment") or {}
            changes = _environment_changes(recorded_env, rerun[stage].manifest["environment"])
            trained_on, here = lineage[stage].get("world_size", 1), w.size
            if spec(stage).distributed and trained_on != here:
                changes.insert(0, f"trained on {trained_on} processes, re-run on {here} (sums in another order); run "
                                  f"`torchrun --nproc_per_node {trained_on} -m clearlm verify` to match")  # fmt: skip
            unchanged = (
                "none of the recorded library versions, thread counts or math-library modes changed "
                "(a kernel that is not deterministic here, or another CPU)"
            )
            lines.append("  likely cause: " + ("; ".join(changes) if changes else unchanged))
            return verdict
    return Verdict(True, lines)
