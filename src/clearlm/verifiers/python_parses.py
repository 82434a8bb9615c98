"""Reward 1 when the completion's code parses as Python (the code of its first fenced block when it has one)."""

from __future__ import annotations

import ast
import re
import warnings
from typing import Any

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def code_of(completion: str) -> str:
    """The first fenced code block's contents (its closing fence may be missing), else the whole completion."""
    found = _FENCE.search(completion)
    return found[1] if found else completion


def parse(code: str) -> ast.Module | None:
    """The module's syntax tree; None when it does not parse or is empty. Parsing never runs the code."""
    if not code.strip():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning of odd escapes: still Python
            return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def verify(completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
    return [float(parse(code_of(c)) is not None) for c in completions]
