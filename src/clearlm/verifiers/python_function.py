"""Reward 1 when the completion's code parses and defines, at top level, the function the row's `entry_point`
names (the built-in stdlib prompts set it from the requested signature); rows without one are not scored."""

from __future__ import annotations

import ast
from typing import Any

from clearlm.verifiers import each
from clearlm.verifiers.python_parses import code_of, parse


def _score(completion: str, row: dict[str, Any]) -> float | None:
    name = row.get("entry_point")
    if not isinstance(name, str) or not name:
        return None
    tree = parse(code_of(completion))
    return float(tree is not None and any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                          and node.name == name for node in tree.body))  # fmt: skip


verify = each(_score)
