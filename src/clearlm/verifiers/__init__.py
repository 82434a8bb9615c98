"""Verifiers: programs that check a completion and give RL its reward (Tulu 3's RLVR). This table is what exists.

A verifier scores a batch at once, `verify(completions, rows) -> list[float | None]`: `rows` are the prompt rows'
fields (the gold `answer`, `tests`, `instruction_id_list`, ...); None means it does not apply to that row (TRL's
convention: excluded from the means, like NaN). Several verifiers combine as TRL combines reward functions: the
weighted sum of those that apply. A verifier that raises is counted against every row of the batch as an error and
gives None, so a broken verifier is reported, never silent.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VerifyFn = Callable[[list[str], list[dict[str, Any]]], list[float | None]]

# name -> (the function, what it rewards); "user" is a function of the recipe's own
VERIFIERS: dict[str, tuple[str, str]] = {
    "answer": ("clearlm.verifiers.answer:verify", "1 if the final answer (GSM8K's `#### x`, else the last number) "
               "equals the row's `answer` (numbers compared as numbers)"),
    "code_tests": ("clearlm.verifiers.code_tests:verify", "1 if the completion's code passes the row's `tests`, run "
                   "in clearlm's sandbox"),
    "ifeval": ("clearlm.verifiers.ifeval:verify", "the share of the row's IFEval instructions (`instruction_id_list`, "
               "`kwargs`) that the completion follows, checked strictly as lm-eval checks them"),
    "python_parses": ("clearlm.verifiers.python_parses:verify", "1 if the completion's code parses as Python"),
    "python_function": ("clearlm.verifiers.python_function:verify", "1 if the completion's code parses and defines "
                        "the top-level function the row's `entry_point` names"),
}  # fmt: skip


def each(score: Callable[[str, dict[str, Any]], float | None]) -> VerifyFn:
    """A verifier that scores completions one at a time, each with its row."""

    def verify(completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
        return [score(completion, row) for completion, row in zip(completions, rows, strict=True)]

    return verify


@dataclass(frozen=True)
class Verifier:
    name: str  # the recipe's name; a user function is "user:file.py:function"
    weight: float
    verify: VerifyFn


def check_name(name: str) -> None:
    """A recipe's verifier name must be in the table (or "user")."""
    if name != "user" and name not in VERIFIERS:
        raise ValueError(f'unknown verifier {name!r} (built in: {", ".join(VERIFIERS)}; or "user" with a function)')


def load(name: str, weight: float, function: str | None, base_dir: Path) -> Verifier:
    """A recipe's verifier; a user's `file.py:function` (relative to the recipe) is imported from that file: it is
    the user's own code, run in this process."""
    check_name(name)
    if name != "user":
        module, _, attr = VERIFIERS[name][0].partition(":")
        return Verifier(name, weight, getattr(importlib.import_module(module), attr))
    from clearlm.verifiers.user import load_function

    assert function is not None  # the recipe validates it
    return Verifier(f"user:{function}", weight, load_function(base_dir, function))


def score(verifiers: Sequence[Verifier], completions: list[str], rows: list[dict[str, Any]]
          ) -> tuple[list[list[float]], Counter[str]]:  # fmt: skip
    """Each completion's reward from each verifier (NaN where it does not apply or failed), and the errors counted
    per verifier ("name: ExceptionType")."""
    errors: Counter[str] = Counter()
    columns = []
    for verifier in verifiers:
        try:
            values = verifier.verify(completions, rows)
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
            column = [math.nan if v is None else float(v) for v in values]
        except Exception as e:
            errors[f"{verifier.name}: {type(e).__name__}: {e}"[:200]] += len(completions)
            column = [math.nan] * len(completions)
        columns.append(column)
    return [list(row) for row in zip(*columns, strict=True)], errors
