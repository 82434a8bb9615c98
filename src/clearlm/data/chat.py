"""Chat data for post-training: the chat template, the readers of SFT formats, and tokenisation with
the mask of the tokens that are trained.

The template is Tulu 3's (`<|system|>`, `<|user|>`, `<|assistant|>` turns, each assistant turn ended
by the end-of-text token) with the assistant's text and end-of-turn token inside
`{% generation %}...{% endgeneration %}`, so transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` and TRL's `assistant_only_loss` see the same trained span.
Rendering follows transformers: Jinja's sandbox with `trim_blocks` and `lstrip_blocks`, the text
tokenised whole without added special tokens, and a token trained when it holds a character of a
generation block (`Encoding.char_to_token` on the block's first and last characters).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

T = TypeVar("T")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
ROLES = ("system", "user", "assistant")
_OPEN, _CLOSE = "\x02", "\x03"  # marks around generation blocks while rendering; refused in messages


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: the body, between two marker characters."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        return _OPEN + caller() + _CLOSE


class BadRow(ValueError):
    """A post-training row that cannot be used; the reason is counted and reported."""


@dataclass(frozen=True)
class Example:
    """One SFT example: messages (a conversation), or a prompt and completion (strings or messages)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | list[dict[str, str]] | None = None
    completion: str | list[dict[str, str]] | None = None


class ChatTemplate:
    def __init__(self, template: str = CHAT_TEMPLATE, eos_token: str = "<|endoftext|>") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
        )
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        self.source, self.eos_token, self._template = template, eos_token, env.from_string(template)

    def render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its generation blocks."""
        marked = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token
        )
        text, spans, start = [], [], 0
        pos = 0
        for ch in marked:
            if ch == _OPEN:
                start = pos
            elif ch == _CLOSE:
                spans.append((start, pos))
            else:
                text.append(ch)
                pos += 1
        return "".join(text), spans

    def encode(
        self, tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(token ids, assistant mask) exactly as `apply_chat_template(..., return_assistant_tokens_mask=True)`."""
        text, spans = self.render(messages, add_generation_prompt)
        enc = _encode_with_specials(tok, text)
        mask = [0] * len(enc.ids)
        for start, end in spans:
            first = enc.char_to_token(start) if end > start else None
            if first is None:
                continue
            last = enc.char_to_token(end - 1)
            for i in range(first, (last + 1) if last is not None else len(mask)):
                mask[i] = 1
        return enc.ids, mask


def _encode_with_specials(tok: Tokenizer, text: str) -> Any:
    """Encode with special-token strings read as special tokens, as transformers does for chat text
    (clearlm's corpus tokenizer reads them as plain text)."""
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = False
    try:
        return tok.encode(text, add_special_tokens=False)
    finally:
        tok.encode_special_tokens = saved


def encode_prompt(tok: Tokenizer, template: ChatTemplate, prompt: str | list[dict[str, str]]) -> list[int]:
    """A prompt's ids: text as it is (special tokens read as such); messages through the chat template with the
    assistant's turn opened, as `apply_chat_template(add_generation_prompt=True)`."""
    if isinstance(prompt, str):
        return _encode_with_specials(tok, prompt).ids
    return template.encode(tok, prompt, add_generation_prompt=True)[0]


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow(f"{where} is not a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRow(f"{where}[{i}]: role must be one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise BadRow(f"{where}[{i}]: content is missing or not a string")
        if _OPEN in content or _CLOSE in content:
            raise BadRow(f"{where}[{i}]: content holds control characters \\x02/\\x03")
        if m["role"] == "assistant" and not content.strip():
            raise BadRow(f"{where}[{i}]: empty assistant turn")
        out.append({"role": m["role"], "content": content})
    return out


def parse_sft_row(row: Any) -> Example:
    """A row of any supported format: `messages` (TRL conversational), `prompt`/`completion`
    (strings or message lists), or Alpaca's `instruction`/`input`/`output`."""
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("messages has no assistant turn")
        return Example(messages=messages)
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise BadRow("empty completion")
            return Example(prompt=prompt, completion=completion)
        prompt_messages, completion_messages = _messages(prompt, "prompt"), _messages(completion, "completion")
        if not any(m["role"] == "assistant" for m in completion_messages):
            raise BadRow("completion has no assistant turn")
        return Example(prompt=prompt_messages, completion=completion_messages)
    if "instruction" in row and "output" in row:
        fields = {k: row.get(k, "") for k in ("instruction", "input", "output")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise BadRow("instruction, input and output must be strings")
        query = "\n".join(v for v in (fields["instruction"], fields["input"]) if v)
        if not query.strip() or not fields["output"].strip():
            raise BadRow("empty instruction or output")
        return Example(
            messages=[{"role": "user", "content": query}, {"role": "assistant", "content": fields["output"]}]
        )
    raise BadRow("no known format: expected messages, prompt/completion or instruction/output")


def _read_rows(path: Path, parse: Callable[[Any], T]) -> Iterator[tuple[str, T | BadRow]]:
    """(where, parsed row or bad row) for each line of a .jsonl file or each item of a .json array."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            yield f"{path}", BadRow("not valid UTF-8")
            return
        except json.JSONDecodeError as e:
            yield f"{path}", BadRow(f"invalid JSON ({e.msg})")
            return
        items = enumerate(rows if isinstance(rows, list) else [rows], start=1)
        label = "item"
    else:
        items = ((n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip())
        label = "line"
    for n, raw in items:
        where = f"{path}:{n}" if label == "line" else f"{path} item {n}"
        try:
            yield where, parse(json.loads(raw.decode("utf-8")) if label == "line" else raw)
        except UnicodeDecodeError:
            yield where, BadRow("not valid UTF-8")
        except json.JSONDecodeError as e:
            yield where, BadRow(f"invalid JSON ({e.msg})")
        except BadRow as e:
            yield where, e


def read_sft(path: Path) -> Iterator[tuple[str, Example | BadRow]]:
    """(where, example or bad row) for each row of a .jsonl file or a .json array."""
    return _read_rows(path, parse_sft_row)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_sft(tok: Tokenizer, template: ChatTemplate, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels with -100 on tokens not trained), as TRL's SFTTrainer builds them with
    `assistant_only_loss=True` (and `completion_only_loss` for prompt-completion data)."""
    if example.messages is not None:
        ids, mask = template.encode(tok, example.messages)
        return ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    if isinstance(example.prompt, str):
        completion = (
            example.completion
            if example.completion.endswith(template.eos_token)
            else (example.completion + template.eos_token)
        )
        prompt_ids = encode_prompt(tok, template, example.prompt)
        ids = _encode_with_specials(tok, example.prompt + completion).ids
        n = common_prefix(prompt_ids, ids)
        return ids, [-100] * n + ids[n:]
    prompt_ids = encode_prompt(tok, template, example.prompt)
    ids, mask = template.encode(tok, [*example.prompt, *example.completion])
    n = common_prefix(prompt_ids, ids)
    return ids, [t if (m and i >= n) else -100 for i, (t, m) in enumerate(zip(ids, mask, strict=True))]


@dataclass(frozen=True)
class Pair:
    """A preference pair: one prompt, a chosen and a rejected answer (strings, or message lists)."""

    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]


ASSISTANT = "\n\nAssistant:"


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH pairs: the shared dialogue up to the last assistant turn is the prompt."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common + 1)
    if cut < 0:
        raise ValueError("the two transcripts share no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _shared_prefix(a: list[dict[str, str]], b: list[dict[str, str]]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse_preference_row(row: Any) -> Pair:
    """prompt/chosen/rejected as strings or message lists (TRL's formats, the prompt optional for
    message lists), or Anthropic HH transcripts (`\\n\\nHuman:` / `\\n\\nAssistant:` turns)."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise BadRow("expected chosen and rejected")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            try:
                prompt, chosen, rejected = split_transcripts(chosen, rejected)
            except ValueError as e:
                raise BadRow(str(e)) from None
        if not isinstance(prompt, str):
            raise BadRow("prompt must be a string when chosen and rejected are")
        if not chosen.strip() or not rejected.strip():
            raise BadRow("empty chosen or rejected answer")
        return Pair(prompt, chosen, rejected)
    chosen_m, rejected_m = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if prompt is None:  # implicit prompt: the messages both conversations share
        n = _shared_prefix(chosen_m, rejected_m)
        prompt_m, chosen_m, rejected_m = chosen_m[:n], chosen_m[n:], rejected_m[n:]
        if not prompt_m:
            raise BadRow("chosen and rejected share no prompt messages")
    else:
        prompt_m = _messages(prompt, "prompt")
    if not chosen_m or not rejected_m or chosen_m[0]["role"] != "assistant" or rejected_m[0]["role"] != "assistant":
        raise BadRow("chosen and rejected must start with an assistant turn")
    return Pair(prompt_m, chosen_m, rejected_m)


def read_preferences(path: Path) -> Iterator[tuple[str, Pair | BadRow]]:
    """(where, pair or bad row) for each row of a .jsonl file or a .json array."""
    return _read_rows(path, parse_preference_row)


def tokenize_pair(tok: Tokenizer, template: ChatTemplate, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) as TRL's DPOTrainer splits them: prompt, prompt+chosen and
    prompt+rejected tokenised whole, cut at their common prefix (string answers get an end-of-text)."""
    if isinstance(pair.prompt, str):
        eos = template.eos_token

        def full(answer: str) -> list[int]:
            return _encode_with_specials(tok, pair.prompt + (answer if answer.endswith(eos) else answer + eos)).ids

        chosen, rejected = full(pair.chosen), full(pair.rejected)
    else:
        chosen, _ = template.encode(tok, [*pair.prompt, *pair.chosen])
        rejected, _ = template.encode(tok, [*pair.prompt, *pair.rejected])
    prompt_ids = encode_prompt(tok, template, pair.prompt)
    n = min(common_prefix(prompt_ids, chosen), common_prefix(prompt_ids, rejected))
    return prompt_ids[:n], chosen[n:], rejected[n:]
