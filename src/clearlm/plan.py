"""Why `run` must build a stage: what differs from the artifact the stage last produced.

The last artifact is the one the recipe's latest release was made from (its `lineage.json`), else the newest of
that stage in the work directory. Its manifest holds the settings, outside inputs and input digests it was made
from; the first of these that differ is named (a setting by its recipe key), else clearlm's own code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clearlm.artifacts import MANIFEST, code_version
from clearlm.stages import spec

if TYPE_CHECKING:
    from clearlm.pipeline import Pipeline


def _previous(pipe: Pipeline, name: str) -> dict[str, Any] | None:
    lineage = pipe.workdir / pipe.recipe.name / "release" / "lineage.json"
    candidates: list[Path] = []
    try:
        digest = json.loads(lineage.read_text())[name]["digest"]
        candidates.append(pipe.store.path_for(name, digest) / MANIFEST)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    candidates += sorted(pipe.store.root.glob(f"{name}-*/{MANIFEST}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def _changed(before: Any, now: Any, prefix: str) -> list[str]:
    """The dotted keys whose values differ between two JSON values."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(before.keys() | now.keys())
        return [k for key in keys for k in _changed(before.get(key), now.get(key), f"{prefix}.{key}".lstrip("."))]
    return [] if before == now else [prefix or "(all)"]


def _shown(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def explain(pipe: Pipeline, name: str) -> str:
    """One phrase: why the stage's artifact is not found."""
    before = _previous(pipe, name)
    if before is None:
        return "not built yet in this work directory"
    stage = spec(name)
    config, identity = json.loads(json.dumps(pipe.made_from(name)))  # as a manifest holds them (tuples as lists)
    settings = _changed(before.get("config"), config, "")
    if settings:
        section = name if name in type(pipe.recipe).model_fields else ""
        return "setting changed: " + _shown([f"{section}.{k}" if section and not k.startswith(section) else k
                                              for k in settings])  # fmt: skip
    inputs = [up for up in stage.needs(pipe.recipe)
              if (before.get("inputs") or {}).get(up, {}).get("digest") != pipe.digest(up)]  # fmt: skip
    if inputs:
        return "input changed: " + _shown(inputs)
    if before.get("sources") != identity:
        return "outside files changed: " + _shown(_changed(before.get("sources"), identity, "") or ["(all)"])
    if before.get("clearlm_version") != code_version():
        return f"clearlm's code changed ({before.get('clearlm_version')} -> {code_version()})"
    return "not found (removed, or made by another recipe)"
