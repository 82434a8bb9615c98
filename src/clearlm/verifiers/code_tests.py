"""Reward 1 when the completion's code passes the row's `tests` (a string, or a list of assert lines) run after it in
clearlm's sandbox, the program laid out as HF code_eval lays it out (`test_setup`, if any, first); all programs of a
batch run at once, one per core. A program that hangs, forks, escapes or floods is contained and gets 0."""

from __future__ import annotations

from typing import Any

from clearlm.sandbox import Limits, run_many
from clearlm.verifiers.python_parses import code_of

TIMEOUT_SECONDS = 10.0


def _tests(row: dict[str, Any]) -> str | None:
    tests = row.get("tests")
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        return "\n".join(tests)
    return tests if isinstance(tests, str) and tests.strip() else None


def verify(completions: list[str], rows: list[dict[str, Any]]) -> list[float | None]:
    programs, where = [], []
    for i, (completion, row) in enumerate(zip(completions, rows, strict=True)):
        tests = _tests(row)
        if tests is not None:
            setup = row.get("test_setup") if isinstance(row.get("test_setup"), str) else ""
            programs.append("\n".join(part for part in (setup, code_of(completion), tests) if part))
            where.append(i)
    out: list[float | None] = [None] * len(completions)
    for i, verdict in zip(where, run_many(programs, Limits(wall_seconds=TIMEOUT_SECONDS)), strict=True):
        out[i] = float(verdict.passed)
    return out
