"""Reward: the share of the row's IFEval instructions (`instruction_id_list`, `kwargs`) the completion follows,
checked strictly by the port of lm-eval's checkers (`clearlm.eval.ifeval`). Rows without instructions are not
scored."""

from __future__ import annotations

import random
from typing import Any

from clearlm.eval.ifeval import score_response
from clearlm.verifiers import each


def _text(row: dict[str, Any]) -> str:
    """The prompt's text (a checker that repeats the prompt needs it): the last user message of a conversation."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt if isinstance(prompt, str) else ""


def _score(completion: str, row: dict[str, Any]) -> float | None:
    ids = row.get("instruction_id_list")
    if not isinstance(ids, list) or not ids:
        return None
    doc = {"instruction_id_list": ids, "kwargs": row.get("kwargs") or [{} for _ in ids], "prompt": _text(row)}
    followed = score_response(doc, completion, random.Random(0))["inst_level_strict_acc"]
    return sum(followed) / len(followed)


verify = each(_score)
