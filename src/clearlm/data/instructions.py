"""The built-in instruction set: "write this standard-library function" from the quickstart corpus.

Each example asks for a top-level function of a training-split module by its signature and the first
line of its docstring; the answer is the function's source. The corpus is the CPython standard library
(Python-2.0), so the set is as open as the corpus and needs no download. Examples are chosen by a hash
of module and function name, so the set is the same on every machine.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from clearlm.data.chat import Example
from clearlm.data.documents import read_jsonl

LICENSE = "Python-2.0"


def _functions(module: str, text: str, max_chars: int) -> list[tuple[str, Example]]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
        source = ast.get_source_segment(text, node)
        if not doc or not source or len(source) > max_chars:
            continue
        prompt = f"Write a Python function `{node.name}({ast.unparse(node.args)})`: {doc}"
        key = hashlib.sha256(f"{module}:{node.name}".encode()).hexdigest()
        out.append((key, Example(messages=[{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": source}])))  # fmt: skip
    return out


def stdlib_function_examples(train_jsonl: Path, n: int, max_chars: int = 700) -> list[Example]:
    """Up to `n` examples from the code documents of the data stage's training split."""
    candidates = []
    for doc in read_jsonl(train_jsonl):
        if doc["source"] == "cpython-stdlib/code" and "repeat" not in doc["metadata"]:
            candidates += _functions(doc["id"], doc["text"], max_chars)
    return [example for _, example in sorted(candidates, key=lambda kv: kv[0])[:n]]
