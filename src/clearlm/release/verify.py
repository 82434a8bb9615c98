"""`clearlm verify`: check a release against its manifest, re-run its recipe, compare every stage.

1. Integrity: every file the release's `manifest.json` lists must have its recorded sha256, and
   no file may be missing or unlisted; an edited or corrupted file is named.
2. Inputs: the raw inputs' digests (source files, the built-in corpus) must equal those recorded.
3. Reproduction: the recipe in `recipe.toml` runs again in a scratch directory, and each stage's
   outputs (data, tokenizer, shards, training, evaluation) are compared with the sha256s recorded in
   `lineage.json`. Files that hold wall-clock times (the training log, checkpoint state) are
   compared without those fields, against the copies in the release where there is one.
The first stage that differs is reported with its files, the largest weight difference, and the
library versions that changed, the likely cause.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from clearlm.artifacts import MANIFEST, environment, sha256_file
from clearlm.data.corpus import data_identity
from clearlm.errors import InputError
from clearlm.pipeline import Pipeline, Reporter, post_training_sources
from clearlm.recipe import load_recipe
from clearlm.train.distributed import shared_path, world

STAGES = ("data", "tokenizer", "shards", "train", "sft", "dpo", "eval")
TIMED = {"train": ("log.jsonl", "checkpoints/*/state.json"), "sft": ("log.jsonl",), "dpo": ("log.jsonl",)}
LOG_COPIES = {"train": "training/log.jsonl", "sft": "post_training/sft_log.jsonl", "dpo": "post_training/dpo_log.jsonl"}
_TIME_KEYS = {"seconds", "tokens_per_s", "mfu", "train_seconds", "elapsed"}


@dataclass
class Verdict:
    reproduced: bool
    lines: list[str] = field(default_factory=list)
    stage: str | None = None
    files: list[str] = field(default_factory=list)
    max_weight_diff: float | None = None


def integrity(folder: Path) -> list[str]:
    """Files of the release that do not match its manifest: changed, missing or not listed."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{folder}: no {MANIFEST}; not a clearlm release")
    outputs = json.loads(manifest_path.read_text())["outputs"]
    problems = [f"{rel}: {'missing' if not (folder / rel).is_file() else 'content differs from manifest'}"
                for rel, digest in outputs.items()
                if not (folder / rel).is_file() or sha256_file(folder / rel) != digest]  # fmt: skip
    listed = set(outputs)
    problems += [f"{p.relative_to(folder).as_posix()}: not in manifest" for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in listed]  # fmt: skip
    return problems


def _without_times(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in _TIME_KEYS}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def _jsonl(path: Path) -> list[Any]:
    return [_without_times(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _weight_diff(release_weights: Path, rerun_weights: Path) -> float:
    """Largest absolute difference between the release's weights (transformers' names) and the re-run's."""
    left = {k.removeprefix("model."): v for k, v in load_file(release_weights).items()}
    right = {k.removeprefix("model."): v for k, v in load_file(rerun_weights).items()}
    common = [k for k in left.keys() & right.keys() if left[k].shape == right[k].shape]
    return max(((left[k].float() - right[k].float()).abs().max().item() for k in common), default=float("inf"))


def _release_copy(folder: Path, stage: str, stages: list[str]) -> Path | None:
    """The release's copy of a stage's final weights: the model itself for the last training stage, the last
    checkpoint for pretraining followed by post-training; None for an SFT model that DPO replaced."""
    final = next(s for s in ("dpo", "sft", "train") if s in stages)
    if stage == final:
        return folder / "model.safetensors"
    if stage == "train":
        steps = sorted(folder.glob("checkpoints/step-*/model.safetensors"), key=lambda p: int(p.parent.name[5:]))
        return steps[-1] if steps else None
    return None


def _compare_stage(stage: str, recorded: dict[str, Any], rerun: Any, release: Path) -> tuple[list[str], list[str]]:
    """(differing files, files compared without their wall-clock fields) for one stage.

    The training log is compared with the release's copy, fields holding times left out; checkpoint
    state files hold the elapsed time and have no copy in the release, so they are not compared
    (the checkpoints' weights and optimizer state are)."""
    differ, timed = [], []
    produced = rerun.manifest["outputs"]
    for rel, digest in recorded["outputs"].items():
        if produced.get(rel) == digest:
            continue
        if any(fnmatch(rel, pattern) for pattern in TIMED.get(stage, ())):
            if rel == "log.jsonl":
                timed.append(rel)
                if _jsonl(release / LOG_COPIES[stage]) != _jsonl(rerun.path / rel):
                    differ.append(rel)
            continue
        differ.append(rel)
    return differ + [rel for rel in produced if rel not in recorded["outputs"]], timed


def _environment_changes(lineage: dict[str, Any]) -> list[str]:
    now = environment()
    then = next(iter(lineage.values()))["environment"]
    return [f"{k} {then.get(k)} (release) vs {now.get(k)} (here)" for k in sorted(set(then) | set(now))
            if k not in ("platform", "cpu_count") and then.get(k) != now.get(k)]  # fmt: skip


def verify_release(
    folder: Path, base_dir: Path | None = None, workdir: Path | None = None, reporter: Reporter | None = None
) -> Verdict:
    folder = Path(folder).resolve()
    problems = integrity(folder)
    if problems:
        return Verdict(False, [f"tampered: {p}" for p in problems], stage="release",
                       files=[p.split(":")[0] for p in problems])  # fmt: skip
    lineage = json.loads((folder / "lineage.json").read_text())
    loaded = load_recipe(folder / "recipe.toml")
    if base_dir is not None:
        loaded = loaded.model_copy(update={"base_dir": Path(base_dir).resolve()})
    recorded_sources = lineage["data"].get("sources")
    here = data_identity(loaded.recipe.data, loaded.base_dir)
    if recorded_sources is not None and recorded_sources != here:
        return Verdict(False, ["inputs differ from those recorded: the raw data is not the same "
                               f"(recorded {json.dumps(recorded_sources)[:200]}; here {json.dumps(here)[:200]}); "
                               "pass --base-dir to point at the recipe's data"], stage="inputs")  # fmt: skip
    for stage in ("sft", "dpo"):
        recorded = lineage.get(stage, {}).get("sources")
        if recorded is None:
            continue
        try:
            now: Any = post_training_sources(getattr(loaded.recipe, stage), loaded.base_dir, loaded.recipe.tokenizer)[1]
        except OSError as err:
            now = f"{err.filename}: {err.strerror}"
        if now != recorded:
            return Verdict(False, [f"{stage} inputs differ from those recorded: the post-training data or base model "
                                   f"is not the same (here: {json.dumps(now)[:200]}); pass --base-dir to point at "
                                   "the recipe's files"], stage="inputs")  # fmt: skip
    w = world()
    with tempfile.TemporaryDirectory(prefix="clearlm-verify-", dir=workdir) as own:
        scratch = shared_path(own, w)  # under torchrun every rank re-runs training in rank 0's folder
        pipe = Pipeline(loaded, Path(scratch), reporter)
        if not w.main:  # the other ranks only take part in pretraining
            if "train" in lineage:
                pipe.train()
            return Verdict(True, [])
        stages = [stage for stage in STAGES if stage in lineage]
        rerun = {stage: pipe.train() if stage == "train" else getattr(pipe, stage)() for stage in stages}
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
            lines.append(f"{stage}: differs: {', '.join(differ[:8])}")
            if "model.safetensors" in differ:
                copy = _release_copy(folder, stage, stages)
                if copy is None:
                    lines.append(f"  the release holds no copy of the {stage} weights to measure the difference")
                else:
                    verdict.max_weight_diff = _weight_diff(copy, rerun[stage].path / "model.safetensors")
                    lines.append(f"  largest absolute weight difference: {verdict.max_weight_diff:.3g} "
                                 f"({copy.relative_to(folder)})")  # fmt: skip
            changes = _environment_changes(lineage)
            trained_on, here = lineage[stage].get("world_size", 1), w.size
            if stage == "train" and trained_on != here:
                changes.insert(0, f"trained on {trained_on} processes, re-run on {here} (sums in another order); run "
                                  f"`torchrun --nproc_per_node {trained_on} -m clearlm verify` to match")  # fmt: skip
            unchanged = "none of the recorded library versions changed (nondeterminism or a different machine)"
            lines.append("  likely cause: " + ("; ".join(changes) if changes else unchanged))
            return verdict
    return Verdict(True, lines)
