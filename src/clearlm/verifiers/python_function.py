"""Reward 1 when the completion's code parses and defines, at top level, the function the row's `entry_point`
names (the built-in stdlib prompts set it from the requested signature); rows without one are not scored."""

from __future__ import annotations

import ast
from typing import Any

from clearlm.verifiers.python_parses import code_of, parse


def verify(completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
    out: list[float | None] = []
    for completion, row in zip(completions, rows, strict=True):
        name = row.get("entry_point")
        if not isinstance(name, str) or not name:
            out.append(None)
            continue
        tree = parse(code_of(completion))
        defined = tree is not None and any(
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in tree.body
        )
        out.append(float(defined))
    return out
