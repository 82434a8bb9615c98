"""Reward 1 when the completion's code parses as Python (the code of its first fenced block when it has one)."""

from __future__ import annotations

import ast
import re
import warnings

from clearlm.verifiers import each

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


verify = each(lambda completion, row: float(parse(code_of(completion)) is not None))
