# Copyright 2023 The Google Research Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Ported from lm-evaluation-harness 0.4.13, lm_eval/tasks/ifeval/utils.py and the ifeval task's aggregation
# (EleutherAI's adaptation of google-research instruction_following_eval/evaluation_lib.py), and modified for
# clearlm: see the package docstring in clearlm/eval/ifeval/__init__.py.

"""Scoring of one response (strict and loose) and aggregation over prompts, as lm-eval's `ifeval` task does."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from clearlm.errors import InputError
from clearlm.eval.ifeval import instructions_util
from clearlm.eval.ifeval.instructions import Instruction
from clearlm.eval.ifeval.instructions_registry import INSTRUCTION_DICT

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def _build_instructions(doc: Mapping[str, Any], rng: random.Random) -> list[Instruction]:
    """One checker per instruction of an IFEval row, built from its kwargs."""
    built = []
    for index, instruction_id in enumerate(doc["instruction_id_list"]):
        if instruction_id not in INSTRUCTION_DICT:
            raise InputError(f"ifeval: unknown instruction {instruction_id!r} (prompt {doc.get('key')})")
        instruction = INSTRUCTION_DICT[instruction_id](instruction_id, rng)
        # Remove None values from kwargs to avoid unexpected keyword argument errors in build_description method.
        # (Like lm-eval, this drops every falsy value: 0, "" and [] too.)
        kwargs = {k: v for k, v in doc["kwargs"][index].items() if v}
        try:
            instruction.build_description(**kwargs)
        except TypeError as e:
            raise InputError(f"ifeval instruction {instruction_id}: bad arguments {kwargs} ({e})") from e
        built.append(instruction)
    return built


def _loose_variants(response: str) -> list[str]:
    """The response, less its first and/or last line and/or its asterisks: loose scoring accepts any of these."""
    r = response.split("\n")
    response_remove_first = "\n".join(r[1:]).strip()
    response_remove_last = "\n".join(r[:-1]).strip()
    response_remove_both = "\n".join(r[1:-1]).strip()
    revised_response = response.replace("*", "")
    revised_response_remove_first = response_remove_first.replace("*", "")
    revised_response_remove_last = response_remove_last.replace("*", "")
    revised_response_remove_both = response_remove_both.replace("*", "")
    return [
        response,
        revised_response,
        response_remove_first,
        response_remove_last,
        response_remove_both,
        revised_response_remove_first,
        revised_response_remove_last,
        revised_response_remove_both,
    ]


def score_response(doc: Mapping[str, Any], response: str, rng: random.Random | None = None) -> dict[str, Any]:
    """lm-eval's `ifeval` `process_results(doc, [response])`: whether the response follows each instruction of
    the IFEval row `doc` (`instruction_id_list`, `kwargs`), strictly and loosely, and whether it follows all.

    Returns `prompt_level_strict_acc` (bool), `inst_level_strict_acc` (list[bool]), `prompt_level_loose_acc`,
    `inst_level_loose_acc`. Needs nltk, langdetect and NLTK's punkt_tab data (an InputError says how to get them).
    `rng` draws the letter of a letter-frequency instruction that names none (two IFEval prompts): pass one generator,
    seeded 0, for a whole run in item order to draw as lm-eval does; the default is a fresh `Random(0)`.
    """
    rng = rng if rng is not None else random.Random(0)
    instructions_util.dependencies()
    # Strict then loose, each with its own checkers, as upstream: the order of any random draws is the same.
    strict = [
        bool(response.strip() and instruction.check_following(response))
        for instruction in _build_instructions(doc, rng)
    ]
    variants = _loose_variants(response)
    loose = [
        any(r.strip() and instruction.check_following(r) for r in variants)
        for instruction in _build_instructions(doc, rng)
    ]
    return {
        "prompt_level_strict_acc": all(strict),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": all(loose),
        "inst_level_loose_acc": loose,
    }


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The four metrics over `score_response` results, as lm-eval aggregates them: prompt-level accuracies are means
    over prompts, instruction-level ones means over all instructions of all prompts."""
    if not rows:
        raise InputError("ifeval: no scored responses to aggregate")
    result = {}
    for metric in METRICS:
        if metric.startswith("prompt_level"):
            values = [row[metric] for row in rows]
        else:
            values = [item for row in rows for item in row[metric]]
        result[metric] = sum(values) / len(values)
    return result
