"""Answer extraction from generations: lm-evaluation-harness's filters, declared as data in a task file.

A filter is a named chain of steps over an item's responses (one per repeat): `regex` keeps a match (or a
fallback) of each, `take_first` keeps the first response, and so on. Each step does exactly what lm-eval's
filter of the same name does, so a task's `[[filters]]` table reads like lm-eval's `filter_list`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clearlm.eval.templates import compiled

Doc = dict[str, Any]


class FilterStep(BaseModel):
    """One step. `regex`: lm-eval's RegexFilter (findall, `group_select`-th match, first non-empty group of a
    tuple, stripped; `fallback` when nothing matches). `template`: render a Jinja template of the document's fields
    and `response` (HumanEval's "prompt + completion"). `code_block`: the first fenced code block (lm-eval's
    mbpp_instruct extraction, an opening fence assumed). `take_first`, `majority_vote`, `lowercase`, `uppercase`,
    `remove_whitespace` (strip), as lm-eval names them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: Literal[
        "regex", "take_first", "majority_vote", "lowercase", "uppercase", "remove_whitespace", "template", "code_block"
    ]
    pattern: str | None = None
    group_select: int = 0
    fallback: str = "[invalid]"
    template: str | None = None

    @model_validator(mode="after")
    def _arguments(self) -> FilterStep:
        if self.function == "regex":
            if self.pattern is None:
                raise ValueError("a regex step needs `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression ({e})") from None
        if self.function == "template":
            if self.template is None:
                raise ValueError("a template step needs `template`")
            try:
                compiled(self.template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"template {self.template!r} is not valid Jinja ({e})") from None
        return self


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    steps: list[FilterStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _take_first_ends(self) -> Filter:
        if any(step.function == "take_first" for step in self.steps[:-1]):
            raise ValueError(f"filter {self.name!r}: take_first leaves one answer, so it must be the last step")
        return self

    @property
    def single(self) -> bool:
        """Whether the filter leaves one answer per item (it ends with take_first)."""
        return self.steps[-1].function == "take_first"


NO_FILTER = Filter(name="none", steps=[FilterStep(function="take_first")])


def _regex(step: FilterStep, response: str) -> str:
    matches = re.findall(step.pattern or "", response)
    if not matches or not -len(matches) <= step.group_select < len(matches):  # (lm-eval: IndexError)
        return step.fallback
    match = matches[step.group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), step.fallback)
    return match.strip()


def _code_block(response: str) -> str:
    pattern = r"```(?:\w+)?\n?(.*?)\n?```"
    matches = re.findall(pattern, "```" + response, re.DOTALL)
    if not matches:
        matches = re.findall(pattern, re.sub("```python", "```", response), re.DOTALL)
    return matches[0] if matches else ""


def _each(step: FilterStep, response: str, doc: Doc) -> str:
    if step.function == "regex":
        return _regex(step, response)
    if step.function == "lowercase":
        return response.lower()
    if step.function == "uppercase":
        return response.upper()
    if step.function == "remove_whitespace":
        return response.strip()
    if step.function == "template":
        return compiled(step.template or "").render(**doc, response=response)
    return _code_block(response)


def apply_filter(flt: Filter, responses: list[str], doc: Doc) -> str | list[str]:
    """The item's responses after each step; `take_first` turns the list into one answer."""
    out: str | list[str] = list(responses)
    for step in flt.steps:  # take_first, which makes the list one answer, is the last step (validated)
        if step.function == "take_first":
            out = out[0]
        elif step.function == "majority_vote":
            out = [Counter(out).most_common(1)[0][0]]
        else:
            out = [_each(step, r, doc) for r in out]
    return out
