"""The generation engine: continuations of many prompts at once, with a key/value cache.

`clearlm generate`, generative evaluation and the release's sample texts generate through `generate` (RL, issue 18,
is to). Prompts are sorted by length and run in batches, left-padded as transformers pads them; each sequence keeps
its own position numbers, and padding is masked out, so a prompt's continuation does not depend on what it is batched
with. A finished sequence (end-of-text, a stop string or its token budget) leaves the batch, so later steps compute
only the live ones. Greedy decoding is `argmax` of the float32 logits, as transformers' `generate(do_sample=False)`;
sampling applies temperature, then top-k, then top-p (transformers' order), and draws each sequence's tokens from its
own generator seeded by (seed, prompt index), so a sample is reproducible whatever the batch size or the other prompts.

The model is clearlm's decoder (its own cache, `Transformer.forward_cached`) or any transformers causal LM (its
`DynamicCache`), behind the same three calls: `prefill`, `step` and `keep`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from tokenizers import Tokenizer

from clearlm.model.auto import CausalLM, TransformersCausalLM
from clearlm.model.transformer import DecodeWeights, Transformer

# A batch's prompts that start with this many common tokens or more (few-shot examples, copies of one prompt) run
# them once and attend to one copy of their keys and values: below it, the extra attention products cost more.
SHARE_PREFIX = 32


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 filter nothing."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self} (temperature >= 0, top_k >= 0, 0 < top_p <= 1)")


@dataclass(frozen=True)
class Completion:
    """A prompt's new tokens (up to and without the end-of-text token; all of them when a stop string ended
    it), their text cut before the first stop string, and why generation ended."""

    tokens: list[int]
    text: str
    finish: Literal["eos", "stop", "length"]


class _Runner(Protocol):
    """One batch of sequences on a model: `prefill` the left-padded prompts (`real`: False at padding) for the last
    position's logits, then `step` one token per sequence; `keep` drops finished sequences."""

    def prefill(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor: ...

    def step(self, ids: torch.Tensor) -> torch.Tensor: ...

    def keep(self, rows: torch.Tensor) -> None: ...


def _positions(real: torch.Tensor) -> torch.Tensor:
    """Position of each token counted over the real ones (padding is on the left), as transformers numbers them."""
    return (real.long().cumsum(1) - 1).clamp(min=0)


class _ClearlmRunner:
    def __init__(self, model: Transformer, batch: int, length: int, weights: DecodeWeights) -> None:
        self.model, self.weights, self.cache = model, weights, model.new_cache(batch, length, weights)
        self.real: torch.Tensor | None = None  # [batch, tokens so far]: False at padding; None when none
        self.next_pos = torch.zeros(batch, dtype=torch.long)
        self.shared = 0  # tokens of the prefix every prompt of the batch starts with, cached once

    def share(self, prefix: list[int]) -> None:
        """Run the prompts' common prefix once; `prefill` then takes what follows it."""
        cache = self.model.new_cache(1, len(prefix), self.weights)
        self.model.hidden_cached(torch.tensor([prefix]), torch.arange(len(prefix))[None], cache, None)
        for layer, shared in zip(self.cache, cache, strict=True):
            layer.prefix = (shared.keys, shared.values)
        self.shared = len(prefix)

    def prefill(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        positions = _positions(real) + self.shared
        self.next_pos = positions[:, -1] + 1
        if bool(real.all()):
            return self.model.forward_cached(ids, positions, self.cache, None, self.weights.lm_head)
        # Padded prompts are prefilled one by one into their rows of the cache: causal attention without a mask
        # (a padded batch's mask sends SDPA to its slow path, twice the time at a thousand tokens), and each prompt's
        # keys and values are what it computes alone. A copy of an earlier row's prompt (RL samples several
        # completions of each) takes that row's keys, values and logits. Decoding steps then mask the padding columns.
        self.real, width, logits, first = real, ids.shape[1], [], {}
        for i, n in enumerate(real.sum(1).tolist()):
            same = first.setdefault(tuple(ids[i, width - n :].tolist()), i)
            if same != i:
                for layer in self.cache:
                    layer.copy_row(same, i)
                logits.append(logits[same])
                continue
            rows = [layer.row(i, width - n) for layer in self.cache]
            logits.append(self.model.forward_cached(ids[i : i + 1, width - n :], positions[i : i + 1, width - n :],
                                                    rows, None, self.weights.lm_head))  # fmt: skip
        for layer in self.cache:
            layer.filled = width
        return torch.cat(logits)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.real is not None:
            self.real = torch.cat([self.real, self.real.new_ones(len(ids), 1)], dim=1)
            mask = self.real[:, None, None, :]
        logits = self.model.forward_cached(ids[:, None], self.next_pos[:, None], self.cache, mask,
                                           self.weights.lm_head)  # fmt: skip
        self.next_pos = self.next_pos + 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        for layer in self.cache:
            layer.keep(rows)
        self.next_pos = self.next_pos[rows]
        if self.real is not None:
            self.real = self.real[rows]


class _TransformersRunner:
    """transformers' own forward and cache, fed the attention mask and positions its `generate` would feed."""

    def __init__(self, hf: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.hf, self.cache = hf, DynamicCache(config=hf.config)
        self.mask = torch.ones(0, 0, dtype=torch.long)
        # the keyword transformers >= 5.2x takes for the cache, `past_key_values` before it
        self.cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        start = self.cache.get_seq_length()
        out = self.hf(
            input_ids=ids, attention_mask=self.mask, position_ids=positions, **{self.cache_arg: self.cache},
            cache_position=torch.arange(start, start + ids.shape[1]), use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1]

    def prefill(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        self.mask = real.long()
        positions = (self.mask.cumsum(1) - 1).masked_fill(self.mask == 0, 1)
        return self._forward(ids, positions)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.mask.sum(1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(ids), 1)], dim=1)
        return self._forward(ids[:, None], positions)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)
        self.mask = self.mask[rows]


def _runner(model: CausalLM, batch: int, length: int, weights: DecodeWeights | None) -> _Runner:
    if isinstance(model, TransformersCausalLM):
        return _TransformersRunner(model.hf)
    return _ClearlmRunner(model, batch, length, weights or model.decode_weights())


def _common_prefix(prompts: list[list[int]]) -> int:
    """How many first tokens all prompts share, leaving each at least one of its own (its last token's logits
    start its continuation)."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        n = next((i for i in range(n) if prompt[i] != first[i]), n)
    return n


def _generator(seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


def choose(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token ids [batch] from float32 logits [batch, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(logits, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # Inverse-CDF sampling with one uniform draw per sequence from its own generator: one batched search instead of
    # a `multinomial` call per row (a third of a small model's sampling step). `right=True` never lands on a token
    # of probability 0: the first cumulative sum above the draw belongs to a token that added to it.
    cdf = logits.softmax(-1).cumsum(-1)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]) * cdf[:, -1]
    draws = torch.minimum(draws, torch.nextafter(cdf[:, -1], torch.zeros_like(draws)))
    return torch.searchsorted(cdf, draws[:, None], right=True)[:, 0]


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string (lm-eval splits at each in turn: the same), and whether one
    occurred."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def _generate_batch(
    model: CausalLM, prompts: list[list[int]], indices: list[int], *, max_new_tokens: int, sampling: Sampling,
    eos_ids: frozenset[int], stop: Sequence[str], decode: Callable[[list[int]], str] | None, pad_id: int,
    weights: DecodeWeights | None,
) -> list[Completion]:  # fmt: skip
    runner = _runner(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens, weights)
    shared = _common_prefix(prompts) if isinstance(runner, _ClearlmRunner) and len(prompts) > 1 else 0
    if shared >= SHARE_PREFIX:
        runner.share(prompts[0][:shared])
        prompts = [p[shared:] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        real[row, width - len(prompt) :] = True
    generators = [_generator(sampling.seed, i) for i in indices]
    live = list(range(len(prompts)))  # the prompts still generating, in batch row order
    new: list[list[int]] = [[] for _ in prompts]
    done: dict[int, Completion] = {}
    logits = runner.prefill(ids, real)
    for step in range(max_new_tokens):
        chosen = choose(logits.float(), sampling, [generators[i] for i in live]).tolist()
        still = []
        for row, (i, token) in enumerate(zip(live, chosen, strict=True)):
            if token in eos_ids:
                done[i] = Completion(new[i], decode(new[i]) if decode else "", "eos")
                continue
            new[i].append(token)
            if stop and decode:
                text, stopped = _cut(decode(new[i]), stop)
                if stopped:
                    done[i] = Completion(new[i], text, "stop")
                    continue
            if step == max_new_tokens - 1:
                done[i] = Completion(new[i], decode(new[i]) if decode else "", "length")
                continue
            still.append(row)
        if not still:
            break
        rows = torch.tensor(still)
        if len(still) < len(live):
            runner.keep(rows)
        live = [live[r] for r in still]
        logits = runner.step(torch.tensor(chosen)[rows])
    return [done[i] for i in range(len(prompts))]


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[Completion]:
    """Continuations of token-id prompts, in the prompts' order. Each stops at an `eos_ids` token, at the first
    of the `stop` strings in its decoded text (which needs `decode`), or after `max_new_tokens`. A prompt longer
    than the model's context leaves room for the new tokens by dropping its oldest ones, as lm-eval does."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if stop and decode is None:
        raise ValueError("stop strings need a decode function")
    context = model.cfg.context
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in a context of {context}")
    kept = [list(p)[-(context - max_new_tokens) :] for p in prompts]
    if any(not p for p in kept):
        raise ValueError("a prompt has no tokens (start it with the model's BOS or end-of-text token)")
    model.eval()
    weights = model.decode_weights() if isinstance(model, Transformer) else None  # once for every batch
    order = sorted(range(len(kept)), key=lambda i: -len(kept[i]))
    out: list[Completion | None] = [None] * len(kept)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        results = _generate_batch(
            model, [kept[i] for i in chunk], chunk, max_new_tokens=max_new_tokens, sampling=sampling,
            eos_ids=frozenset(eos_ids), stop=[s for s in stop if s], decode=decode, pad_id=pad_id, weights=weights,
        )  # fmt: skip
        for i, result in zip(chunk, results, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]


def complete(
    model: CausalLM,
    tok: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    stop: Sequence[str] = (),
) -> str:
    """One text prompt's continuation, cut before the first stop string: what `clearlm generate` prints. An empty
    prompt starts from the end-of-text token, as a document does."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids and eos_id is not None:
        ids = [eos_id]
    out = generate(model, [ids], max_new_tokens=max_new_tokens, sampling=sampling,
                   eos_ids=[] if eos_id is None else [eos_id], stop=stop, decode=tok.decode)  # fmt: skip
    return out[0].text
