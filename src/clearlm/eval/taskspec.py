"""Tasks as data: one TOML/YAML file names a data file, Jinja prompt templates and the metrics.

Templates follow lm-evaluation-harness's conventions, so its default task configs translate one to
one: `doc_to_text` renders the context; `doc_to_choice` renders a Python list literal (or names a
field holding a list); `doc_to_target` renders an index into the choices or, for
`loglikelihood`/`generate` tasks, the target text. With `partial = true` (Winogrande-style "partial
evaluation"), `doc_to_text` gives the gold index, the choices are alternative contexts and the target
is the continuation that all of them share.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from clearlm.errors import InputError
from clearlm.eval import bbq
from clearlm.eval.filters import Filter
from clearlm.eval.templates import compiled

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Doc = dict[str, Any]


def _hellaswag(doc: Doc) -> Doc:
    """lm-eval's hellaswag preprocessing (WikiHow bracket artefacts removed)."""

    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        text = re.sub("\\[.*?\\]", "", text)
        return text.replace("  ", " ")

    # upstream rows have ctx_a/ctx_b; the local copy keeps only the joined `ctx`, ctx_b's case unchanged
    split = "ctx_a" in doc and "ctx_b" in doc
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if split else doc["ctx"]
    return {
        **doc,
        "query": clean(doc["activity_label"] + ": " + ctx),
        "choices": [clean(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _winogrande(doc: Doc) -> Doc:
    """The blank splits the sentence: each option completes the context, the rest is the target."""
    idx = doc["sentence"].index("_")
    return {
        **doc,
        "contexts": [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])],
        "continuation": doc["sentence"][idx + 1 :].strip(),
        "gold": {"1": 0, "2": 1}[str(doc["answer"])],
    }


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


def _next_line(doc: Doc) -> Doc | None:
    """Which line comes next? From one held-out source file: ten lines of context, the true next line
    and three other lines of the same file, all picked by hashing the document id (no RNG state).
    Files too short to give four distinct candidate lines are skipped."""
    lines = [line for line in doc["text"].splitlines() if line.strip()]
    candidates = sorted({line for line in lines[10:] if len(line.strip()) >= 12})
    positions = [i for i in range(10, len(lines)) if len(lines[i].strip()) >= 12]
    if len(candidates) < 4 or not positions:
        return None
    i = positions[_stable_int(doc["id"], "position") % len(positions)]
    others = sorted((c for c in candidates if c != lines[i]), key=lambda c: _stable_int(doc["id"], c))[:3]
    gold = _stable_int(doc["id"], "gold") % 4
    choices = [*others[:gold], lines[i], *others[gold:]]
    return {"id": doc["id"], "context": "\n".join(lines[i - 10 : i]) + "\n", "choices": choices, "gold": gold}


def _self_contained(node: ast.FunctionDef) -> bool:
    """Whether defining the function evaluates nothing from its module: no decorators, annotations or non-constant
    defaults (all of which run at definition time)."""
    args = node.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
    defaults = [d for d in (*args.defaults, *args.kw_defaults) if d is not None]
    return (not node.decorator_list and node.returns is None and all(a.annotation is None for a in every)
            and all(isinstance(d, ast.Constant) for d in defaults))  # fmt: skip


def _function_body(doc: Doc) -> Doc | None:
    """Write this function: from one held-out source file, a top-level function with a docstring whose definition is
    self-contained (picked by hashing the document id); its signature and docstring are the prompt, its original body
    the reference. Files with no such function (or that do not parse) are skipped."""
    try:
        tree = ast.parse(doc["text"])
    except (SyntaxError, ValueError):
        return None
    lines = doc["text"].splitlines(keepends=True)
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and len(node.body) > 1 and (
                _self_contained(node)):  # fmt: skip
            # the prompt stops at the docstring's closing quotes: the newline and indent of the body's first line are
            # one token for a BPE tokenizer, which a prompt ending in "\n" would split as training never did
            prompt = "".join(lines[node.lineno - 1 : node.body[0].end_lineno]).rstrip("\n")
            body = "".join(lines[node.body[0].end_lineno : node.end_lineno])
            if len(prompt) <= 600 and body.strip():
                found.append({"name": node.name, "prompt": prompt, "body": body})
    if not found:
        return None
    pick = found[_stable_int(doc["id"], "function") % len(found)]
    return {"id": doc["id"], **pick}


PREPROCESSORS: dict[str, Callable[[Doc], Doc | None]] = {
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "next_line": _next_line,
    "function_body": _function_body,
    "bbq": bbq.preprocess,
}


class ExactMatch(BaseModel):
    """lm-eval's exact_match options: each regex removed from prediction and reference, then case, punctuation and
    digits ignored as asked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regexes_to_ignore: list[str] = []
    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_numbers: bool = False


METRICS = {
    "multiple_choice": {"acc", "acc_norm", "mc2", "likelihood_diff", "pct_stereotype", "accuracy_amb",
                        "accuracy_disamb", "amb_bias_score", "disamb_bias_score"},
    "loglikelihood": {"acc", "perplexity"},
    "generate": {"exact_match", "pass@k", "prompt_level_strict_acc", "inst_level_strict_acc",
                 "prompt_level_loose_acc", "inst_level_loose_acc"},
}  # fmt: skip
Metric = Literal[
    "acc", "acc_norm", "perplexity", "exact_match", "pass@k", "mc2", "likelihood_diff", "pct_stereotype",
    "accuracy_amb", "accuracy_disamb", "amb_bias_score", "disamb_bias_score", "prompt_level_strict_acc",
    "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc",
]  # fmt: skip


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data_file: str = Field(description="jsonl, json, csv or parquet; relative to --data-dir or the task file")
    source: str = Field("", description="where the data comes from upstream")
    license: str = "NOASSERTION"
    output_type: Literal["multiple_choice", "loglikelihood", "generate"] = "multiple_choice"
    doc_to_text: str
    doc_to_choice: str | None = None
    doc_to_target: str
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    partial: bool = False
    preprocess: Literal["hellaswag", "winogrande", "next_line", "function_body", "bbq"] | None = None
    doc_to_labels: str | None = Field(None, description="mc2: a 0/1 list marking the true choices")
    num_fewshot: int = Field(0, ge=0, description="shots when the command line names none (lm-eval's default)")
    test_filter: str | None = Field(None, description="Jinja test of a row: which rows are evaluated")
    fewshot_filter: str | None = Field(None, description="Jinja test of a row: which rows give the examples")
    fewshot_sampler: Literal["random", "first_n"] = "random"
    fewshot_fields: dict[str, Any] = Field({}, description="fields added to each few-shot example's row")
    until: list[str] = ["\n\n"]
    max_gen_tokens: int = Field(32, gt=0)
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repeats: int = Field(1, ge=1, description="generations per item (pass@k with n samples)")
    filters: list[Filter] = []
    exact_match: ExactMatch = ExactMatch()
    pass_k: list[PositiveInt] = Field([1], min_length=1)
    timeout: float = Field(3.0, gt=0, description="seconds of wall time per program of a code task")
    metrics: list[Metric] | None = None
    base_dir: Path | None = Field(None, exclude=True)

    @field_validator("data_file")
    @classmethod
    def _relative(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"{value!r} must be a path (or pattern) inside the data directory")
        return value

    @field_validator("doc_to_text", "doc_to_target", "doc_to_choice", "doc_to_labels", "test_filter", "fewshot_filter")
    @classmethod
    def _jinja(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compiled(value)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"{value[:60]!r} is not valid Jinja ({e})") from None
        return value

    @model_validator(mode="after")
    def _metrics_fit_output_type(self) -> TaskSpec:
        allowed = {"acc"} if self.partial else METRICS[self.output_type]
        if self.metrics is None:
            object.__setattr__(self, "metrics", ["exact_match"] if self.output_type == "generate" else ["acc"])
        wrong = [m for m in self.metrics if m not in allowed]
        if wrong:
            kind = (
                "partial multiple_choice"
                if self.partial and self.output_type == "multiple_choice"
                else self.output_type
            )
            raise ValueError(f"metrics {wrong} do not apply to {kind} tasks (use {sorted(allowed)})")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise ValueError("multiple_choice tasks need doc_to_choice")
        if "mc2" in self.metrics and self.doc_to_labels is None:
            raise ValueError("the mc2 metric needs doc_to_labels")
        if "pass@k" in self.metrics and max(self.pass_k) > self.repeats:
            k = max(self.pass_k)
            raise ValueError(f"pass@{k} needs at least {k} repeats (repeats = {self.repeats})")
        if "pass@k" in self.metrics and self.repeats > 1 and any(f.single for f in self.filters):
            raise ValueError("pass@k scores every sample: its filters must not end with take_first")
        single = [m for m in self.metrics if m not in ("pass@k", "acc", "acc_norm", "perplexity")]
        if self.output_type == "generate" and single and not all(f.single for f in self.filters):
            raise ValueError(f"{single[0]} scores one answer per item: end every filter with take_first")
        if self.filters and self.output_type != "generate":
            raise ValueError("filters apply to generate tasks only")
        if self.fewshot_fields and self.fewshot_filter is None:
            raise ValueError("fewshot_fields need fewshot_filter (the rows the examples come from)")
        if self.repeats > 1 and self.temperature == 0:
            raise ValueError("repeats > 1 with greedy decoding (temperature 0) gives the same answer each time")
        return self

    def selects(self, condition: str | None, doc: Doc) -> bool:
        """Whether a row passes a `test_filter`/`fewshot_filter` Jinja test (no test: every row)."""
        return condition is None or compiled(condition).render(**doc).strip() == "True"

    def labels(self, doc: Doc) -> list[int]:
        value = self._render(self.doc_to_labels or "", doc)
        if isinstance(value, str):
            value = ast.literal_eval(value)
        if not isinstance(value, list) or len(value) != len(self.choices(doc)):
            raise ValueError(f"doc_to_labels must give one 0/1 label per choice, got {value!r}")
        return [int(v) for v in value]

    @property
    def pattern(self) -> bool:
        """Whether `data_file` is a glob pattern (`bbq/*.jsonl`) rather than one file."""
        return any(c in self.data_file for c in "*?[")

    def located(self, data_dir: Path | list[Path] | None) -> tuple[Path, list[Path]]:
        """(the folder holding the task's data, its data files): `data_file` under the first of the data directories
        (then the task file's folder) that has it; a pattern gives every match there, in name order."""
        dirs = data_dir if isinstance(data_dir, list) else [data_dir]
        candidates = [d for d in (*dirs, self.base_dir) if d is not None]
        for folder in candidates:
            if self.pattern:
                found = sorted(p for p in folder.glob(self.data_file) if p.is_file())
            else:
                found = [folder / self.data_file] if (folder / self.data_file).is_file() else []
            if found:
                return folder, found
        where = candidates[0] / self.data_file if candidates else Path(self.data_file)
        origin = f" (upstream: {self.source}, licence {self.license})" if self.source else ""
        raise InputError(f"{where}: data file for task {self.name!r} not found{origin}; pass --data-dir")

    def data_paths(self, data_dir: Path | list[Path] | None) -> list[Path]:
        """The task's data files (see `located`)."""
        return self.located(data_dir)[1]

    def data_path(self, data_dir: Path | list[Path] | None) -> Path:
        """The first data file (the only one unless `data_file` is a pattern)."""
        return self.data_paths(data_dir)[0]

    def _render(self, template: str, doc: Doc) -> str:
        if template and template in doc:  # a field's name (a CSV's unnamed index column is "": not a field)
            return doc[template]
        return compiled(template).render(**doc)

    def text(self, doc: Doc) -> str | int:
        out = self._render(self.doc_to_text, doc)
        return int(out) if self.partial else out

    def choices(self, doc: Doc) -> list[str]:
        if self.doc_to_choice is None:
            return []
        value = self._render(self.doc_to_choice, doc)
        if isinstance(value, str):
            value = ast.literal_eval(value)
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError(f"doc_to_choice must give a list of strings, got {value!r}")
        return value

    def target(self, doc: Doc) -> int | str:
        value = self._render(self.doc_to_target, doc)
        if self.output_type == "multiple_choice" and not self.partial:
            return int(value)
        return value

    def prepare(self, doc: Doc) -> Doc | None:
        """The document as the templates see it; None when the task's preprocessing skips it."""
        return PREPROCESSORS[self.preprocess](doc) if self.preprocess else doc


def _read_rows(path: Path) -> Iterator[tuple[int, Doc]]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
    elif name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), 2)
    elif name.endswith(".json"):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON array of objects")
        yield from enumerate(rows, 1)
    else:  # JSON lines, gzipped when the name ends in .gz (HumanEval's release)
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield i, json.loads(line)
                        except json.JSONDecodeError as e:
                            raise InputError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InputError(f"{path}: not a readable gzip file ({e})") from None


def load_docs(
    spec: TaskSpec, data_dir: Path | list[Path] | None, limit: int | None = None, *, fewshot: bool = False
) -> list[Doc]:
    """The task's documents (with `fewshot`, those its examples come from, `fewshot_fields` added), preprocessed and
    checked: a bad row names the file and line."""
    docs: list[Doc] = []
    folder, paths = spec.located(data_dir)
    for path in paths:
        if limit is not None and len(docs) >= limit:
            break
        try:
            docs += _load_docs(spec, path, None if limit is None else limit - len(docs), fewshot)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not valid UTF-8") from None
    if not docs:
        condition = spec.fewshot_filter if fewshot else spec.test_filter
        why = f" pass {'fewshot_filter' if fewshot else 'test_filter'} {condition!r}" if condition else ""
        raise InputError(f"{folder / spec.data_file}: no documents{why}")
    return docs


def _load_docs(spec: TaskSpec, path: Path, limit: int | None, fewshot: bool) -> list[Doc]:
    docs = []
    condition = spec.fewshot_filter if fewshot else spec.test_filter
    for line, row in _read_rows(path):
        if limit is not None and len(docs) >= limit:
            break
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object")
        try:
            if not spec.selects(condition, row):
                continue
            doc = spec.prepare({**row, **spec.fewshot_fields} if fewshot else row)
            if doc is None:
                continue
            spec.text(doc), spec.choices(doc), spec.target(doc)
            if spec.doc_to_labels is not None:
                spec.labels(doc)
        except (KeyError, ValueError, TypeError, SyntaxError, jinja2.TemplateError) as e:
            raise InputError(f"{where}: task {spec.name!r} cannot use this row ({type(e).__name__}: {e})") from None
        if spec.output_type == "multiple_choice":
            if any(c == "" for c in spec.choices(doc)):
                raise InputError(f"{where}: task {spec.name!r} has an empty choice")
            n = len(spec.choices(doc))
            gold = spec.text(doc) if spec.partial else spec.target(doc)
            if not 0 <= gold < n:
                raise InputError(f"{where}: gold index {gold} is outside the {n} choices")
        docs.append(doc)
    return docs


def _load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{path}: invalid YAML ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML ({e})") from None


def load_task_file(path: Path) -> TaskSpec:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: task file not found")
    raw = _load_file(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a task file must be a mapping of settings")
    try:
        return TaskSpec.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(task)"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise InputError(f"{path}: {loc}: {msg}") from None


def builtin_tasks() -> dict[str, TaskSpec]:
    folder = resources.files("clearlm.eval").joinpath("tasks")
    specs = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            spec = TaskSpec.model_validate(tomllib.loads(entry.read_text()))
            specs[spec.name] = spec
    return specs


def capped(specs: list[TaskSpec], max_gen_tokens: int | None) -> list[TaskSpec]:
    """The tasks with each generative task's budget capped at `max_gen_tokens` (lm-eval's `max_gen_toks` generation
    argument): a small model's context cannot hold a long prompt and a long answer."""
    if not max_gen_tokens:
        return specs
    return [s.model_copy(update={"max_gen_tokens": min(s.max_gen_tokens, max_gen_tokens)})
            if s.output_type == "generate" else s for s in specs]  # fmt: skip


def resolve_tasks(names: list[str], task_files: list[Path]) -> list[TaskSpec]:
    known = builtin_tasks()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)}; `clearlm eval --list` shows the built-in tasks")
    return [known[n] for n in names] + [load_task_file(f) for f in task_files]
