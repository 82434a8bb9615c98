"""Do two runs of a recipe agree, and where do they first part? What `verify` (a release against its re-run),
the kill trials and the reproducibility tests (two work directories) all ask.

Files that hold wall-clock times (training logs, checkpoint state, the release's lineage) are compared without
those fields; everything else by digest. A difference is located at the first stage, and for a training stage
at the first step whose log record differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clearlm.artifacts import MANIFEST
from clearlm.stages import names

TIME_KEYS = {"seconds", "mfu", "train_seconds", "elapsed", "created"}  # and every throughput, `*_per_s`
# Release files that print timings (throughput, seconds) or the day the run was made; all they describe is
# compared in the stages themselves.
RELEASE_TIMED = ("README.md", "report.html", "mot.yml")


def without_times(obj: Any) -> Any:
    """A JSON value with every wall-clock field left out, at any depth."""
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in TIME_KEYS and not k.endswith("_per_s")}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def jsonl(path: Path) -> list[Any]:
    """A JSON-lines file's records without their wall-clock fields."""
    return [without_times(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def timed(rel: str) -> bool:
    """Files that hold wall-clock times, so that their digests differ between identical runs."""
    return rel.endswith(("log.jsonl", "state.json", "checksums.json"))  # a checkpoint's checksums: of its state too


def comparable(path: Path, digest: str) -> Any:
    """What must be equal between two runs: a file's digest, or for the files that hold wall-clock times their
    content without them (as text where the order of keys counts)."""
    if path.name.endswith("log.jsonl"):
        return jsonl(path)
    if path.name == "state.json":
        return json.dumps(without_times(json.loads(path.read_text())))
    if path.name == "checksums.json":
        return json.dumps({rel: d for rel, d in json.loads(path.read_text()).items() if not timed(rel)})
    if path.name == "lineage.json":  # when each stage was made, and the digests of its timed files
        lineage = {stage: {key: {rel: d for rel, d in value.items() if not timed(rel)} if key == "outputs" else value
                           for key, value in entry.items() if key != "created"}
                   for stage, entry in json.loads(path.read_text()).items()}  # fmt: skip
        return json.dumps(lineage)
    return digest


def stage_outputs(workdir: Path) -> dict[str, dict[str, Any]]:
    """Per finished stage of a work directory, in stage order, each output file as `comparable` gives it."""
    found: dict[str, dict[str, Any]] = {}
    root = workdir / "artifacts"
    for art in sorted(root.iterdir()) if root.is_dir() else []:
        kind = art.name.rsplit("-", 1)[0]
        if art.name.endswith(".partial") or kind not in names() or not (art / MANIFEST).is_file():
            continue
        outputs = json.loads((art / MANIFEST).read_text())["outputs"]
        found[kind] = {rel: comparable(art / rel, digest) for rel, digest in outputs.items()
                       if kind != "release" or rel not in RELEASE_TIMED}  # fmt: skip
    return {stage: found[stage] for stage in names() if stage in found}  # in the order the stages run


def first_step(ours: list[Any], theirs: list[Any]) -> int | None:
    """The step of the first log record that differs (a missing record counts), or None."""
    for k in range(max(len(ours), len(theirs))):
        a, b = (ours[k] if k < len(ours) else {}), (theirs[k] if k < len(theirs) else {})
        if a != b:
            return (a or b).get("step")
    return None


def first_difference(reference: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> str | None:
    """The first stage whose outputs differ (from `stage_outputs`), with its files and, for a training stage,
    the first differing step; None when every stage of `reference` agrees."""
    for stage in (s for s in names() if s in reference):
        ours, theirs = reference[stage], other.get(stage)
        if theirs is None:
            return f"{stage}: missing"
        differ = sorted(rel for rel in ours.keys() | theirs.keys() if ours.get(rel) != theirs.get(rel))
        if not differ:
            continue
        log = next((rel for rel in differ if rel.endswith("log.jsonl")), None)
        step = first_step(ours.get(log) or [], theirs.get(log) or []) if log else None
        return f"{stage}{f' from step {step}' if step is not None else ''}: {', '.join(differ[:4])}"
    return None
