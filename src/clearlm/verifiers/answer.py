"""Reward 1 when the completion's final answer equals the row's `answer`: GSM8K's strict `#### x` when present,
else the last number (lm-eval's flexible-extract), compared as numbers after dropping commas, dollar signs and a
final period; a non-numeric gold answer is compared as text, case and surrounding space ignored."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from clearlm.verifiers import each

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _number(text: str) -> Decimal | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract(completion: str) -> str | None:
    """The answer a completion gives: after `#### `, else its last number; None when it gives none."""
    strict = _STRICT.findall(completion)
    if strict:
        return strict[0]
    found = [a or b for a, b in _NUMBER.findall(completion)]
    return found[-1] if found else None


def gold(row: dict[str, Any]) -> str | None:
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if not isinstance(answer, str) or not answer.strip():
        return None
    return answer.rpartition("#### ")[2]  # a GSM8K solution: the part after ####


def _score(completion: str, row: dict[str, Any]) -> float | None:
    want = gold(row)
    if want is None:
        return None
    target = _number(want)
    if target is None:  # a text answer
        return float(completion.strip().casefold().endswith(want.strip().casefold()))
    given = extract(completion)
    value = _number(given) if given is not None else None
    return float(value is not None and value == target)


verify = each(_score)
