"""Evaluation outputs: `results.json` (metrics, config, digests) and `samples.jsonl` (per item)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from clearlm import __version__
from clearlm.artifacts import sha256_file
from clearlm.eval.taskspec import TaskSpec


def describe_inputs(model_dir: Path, specs: list[TaskSpec], data_dir: Path | None) -> dict[str, Any]:
    weights = sorted(model_dir.glob("*.safetensors"))
    return {
        "model": {"path": str(model_dir), "weights": {w.name: sha256_file(w) for w in weights}},
        "data": {s.name: _data_files(s, data_dir) for s in specs},
    }


def _data_files(spec: TaskSpec, data_dir: Path | None) -> dict[str, Any]:
    """Where a task's data came from: its file and sha256, or with a pattern (`bbq/*.jsonl`) each match's."""
    paths = spec.data_paths(data_dir)
    where = {"files": {str(p): sha256_file(p) for p in paths}} if spec.pattern else {
        "file": str(paths[0]), "sha256": sha256_file(paths[0])}  # fmt: skip
    return {**where, "source": spec.source, "license": spec.license}


def write_samples(path: Path, samples: list[dict[str, Any]], append: bool = False) -> None:
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_results(out: Path, results: dict[str, Any], samples: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write both files into `out` atomically: a temporary folder renamed into place."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    doc = {"clearlm_version": __version__, "results": results, **meta}
    (tmp / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    write_samples(tmp / "samples.jsonl", samples)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
