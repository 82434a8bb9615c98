"""The built-in instruction and preference sets: "write this standard-library function".

Each example asks for a top-level function of a training-split module by its signature and the first
line of its docstring; the answer is the function's source. For preference pairs the rejected answer
is plausibly wrong: another function's source, the function cut after half its lines, or its body's
lines in shuffled order. The corpus is the CPython standard library (Python-2.0), so the sets are as
open as the corpus and need no download. Everything is chosen by hashes of module and function names,
so the sets are the same on every machine.
"""

from __future__ import annotations

import ast
import hashlib
import random
from pathlib import Path
from typing import Any

from clearlm.data.chat import Example, Pair
from clearlm.data.documents import read_jsonl

LICENSE = "Python-2.0"


def _functions(module: str, text: str, max_chars: int) -> list[tuple[str, str, str]]:
    """(hash key, prompt, source) for each documented public top-level function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out, lines = [], None
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.end_lineno is None:
            continue
        doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
        if not doc:
            continue
        lines = lines or text.splitlines()
        source = "\n".join(lines[node.lineno - 1 : node.end_lineno])  # top-level: starts at column 0
        if len(source) > max_chars:
            continue
        prompt = f"Write a Python function `{node.name}({ast.unparse(node.args)})`: {doc}"
        out.append((hashlib.sha256(f"{module}:{node.name}".encode()).hexdigest(), prompt, source))
    return out


def _candidates(train_jsonl: Path, max_chars: int) -> list[tuple[str, str, str]]:
    found = []
    for doc in read_jsonl(train_jsonl):
        if doc["source"] == "cpython-stdlib/code" and "repeat" not in doc["metadata"]:
            found += _functions(doc["id"], doc["text"], max_chars)
    return sorted(found)


def _turns(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def stdlib_function_examples(train_jsonl: Path, n: int, max_chars: int = 700) -> list[Example]:
    """Up to `n` SFT examples from the code documents of the data stage's training split."""
    return [Example(messages=_turns(prompt, source)) for _, prompt, source in _candidates(train_jsonl, max_chars)[:n]]


def _wrong(key: str, source: str, other: str) -> str:
    lines = source.split("\n")
    kind = int(key[:8], 16) % 3
    if kind == 0 or len(lines) < 4:
        return other
    if kind == 1:
        return "\n".join(lines[: max(2, len(lines) // 2)])
    body = lines[1:]
    random.Random(key).shuffle(body)
    return "\n".join([lines[0], *body]) if body != lines[1:] else other


def stdlib_function_pairs(train_jsonl: Path, n: int, max_chars: int = 700) -> list[Pair]:
    """Up to `n` preference pairs: the real function (chosen) against a plausibly wrong one (rejected).
    They are taken from the other end of the hash order than the SFT examples, so the two sets share no
    function unless the corpus has fewer functions than both sets together."""
    found = _candidates(train_jsonl, max_chars)
    pairs = []
    for i, (key, prompt, source) in enumerate(found):
        other = found[(i + 1) % len(found)][2]
        rejected = _wrong(key, source, other)
        if rejected != source:
            pairs.append(Pair([{"role": "user", "content": prompt}], [{"role": "assistant", "content": source}],
                              [{"role": "assistant", "content": rejected}]))  # fmt: skip
    return pairs[::-1][:n]


def stdlib_function_prompts(train_jsonl: Path, n: int, max_chars: int = 700) -> list[dict[str, Any]]:
    """Up to `n` RL prompt rows: the request for a function (as the SFT examples ask) and its name as the
    `entry_point` the `python_function` verifier looks for. Ordered by another hash than the SFT and DPO sets."""
    found = sorted(_candidates(train_jsonl, max_chars), key=lambda c: hashlib.sha256(f"rlvr:{c[0]}".encode()).digest())
    rows = []
    for _, prompt, _ in found[:n]:
        name = prompt.split("`", 2)[1].partition("(")[0]
        rows.append({"prompt": [{"role": "user", "content": prompt}], "entry_point": name})
    return rows
