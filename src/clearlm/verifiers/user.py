"""A verifier of the user's own: `file.py:function`, a Python function in a file next to the recipe, called as TRL
calls reward functions: `function(prompts=[...], completions=[...], **columns)` with each of the rows' other fields
as a list, returning one float (or None) per completion. It runs in clearlm's process: it is the user's code, trusted
as the recipe is."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from clearlm.errors import RecipeError
from clearlm.verifiers import VerifyFn


def load_function(base_dir: Path, spec: str) -> VerifyFn:
    file, _, name = spec.rpartition(":")
    path = (base_dir / file).resolve()
    if not path.is_file():
        raise RecipeError(f"rlvr.verifiers: function {spec!r}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"clearlm_user_verifier_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise RecipeError(f"rlvr.verifiers: function {spec!r}: {path} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise RecipeError(f"rlvr.verifiers: {path}: importing it failed: {type(e).__name__}: {e}") from e
    function = getattr(module, name, None)
    if not callable(function):
        raise RecipeError(f"rlvr.verifiers: {path} has no function {name!r}")

    def verify(completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
        columns = {key: [row.get(key) for row in rows] for key in {k for row in rows for k in row} - {"prompt"}}
        values = function(prompts=[row.get("prompt") for row in rows], completions=completions, **columns)
        return [None if v is None else float(v) for v in values]

    return verify
