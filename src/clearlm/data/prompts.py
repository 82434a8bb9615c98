"""RL prompt rows: a `prompt` (text, or a list of chat messages ending with a user turn) and the fields its verifiers
read (`answer`, `tests`, `instruction_id_list`, `entry_point`, ...), one JSON object per line or a .json array."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clearlm.data.chat import BadRow, _messages, _read_rows


def parse_prompt_row(row: Any) -> dict[str, Any]:
    """The row, checked: its prompt is non-empty text or valid messages whose last turn is the user's."""
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    if "prompt" not in row:
        raise BadRow("no prompt field")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("empty prompt")
        return row
    messages = _messages(prompt, "prompt")
    if messages[-1]["role"] != "user":
        raise BadRow("prompt: the last message must be the user's (the completion is the assistant's reply)")
    return {**row, "prompt": messages}


def read_prompts(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """(where, row or bad row) for each row of a .jsonl file or a .json array."""
    return _read_rows(path, parse_prompt_row)
