"""Log-likelihood of continuations, tokenised and windowed exactly as lm-evaluation-harness does.

A request is (context, continuation). As in lm-eval's HF model: trailing spaces of the context move
to the continuation; the pair is encoded whole and the context alone, and the continuation tokens
are the whole encoding past the context's; an empty context becomes the prefix token; the input is
the last `context + 1` tokens minus one. Differences from lm-eval are only in speed: requests are
sorted by length and batched, and only the continuation positions go through the output layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from clearlm.errors import InputError
from clearlm.model.transformer import DecodeWeights, Transformer


@dataclass(frozen=True)
class Score:
    logprob: float
    is_greedy: bool
    n_tokens: int


class Encoder:
    """Tokenisation with lm-eval's conventions for a `tokenizers` tokenizer."""

    def __init__(self, tok: Tokenizer, prefix_id: int) -> None:
        self.tok, self.prefix_id = tok, prefix_id
        self.prefix_text = tok.decode([prefix_id], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        add_special = not (self.prefix_text and text.startswith(self.prefix_text))
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tok.encode(continuation, add_special_tokens=False).ids
            return ([self.prefix_id], cont) if cont[:1] != [self.prefix_id] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]


def _logits_at(model: nn.Module, ids: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Logits at the given (row, position) pairs; clearlm's decoder runs its output layer only there."""
    index = (torch.tensor(rows), torch.tensor(cols))
    if isinstance(model, Transformer):
        return model.lm_head(model.hidden_states(ids)[index])
    return model(ids)[index]


@torch.no_grad()
def score_windows(model: nn.Module, windows: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[Score]:
    """Score (input, targets) windows, where the last len(targets) positions of input predict targets.

    Windows are sorted by length and batched with right padding; only the target positions go
    through the output layer.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    scores: list[Score | None] = [None] * len(windows)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids = torch.zeros(len(chunk), len(windows[chunk[0]][0]), dtype=torch.long)
        rows, cols = [], []
        for row, i in enumerate(chunk):
            inp, cont = windows[i]
            ids[row, : len(inp)] = torch.tensor(inp)
            rows += [row] * len(cont)
            cols += range(len(inp) - len(cont), len(inp))
        chunk_scores = _scores(_logits_at(model, ids.to(device), rows, cols), [windows[i][1] for i in chunk])
        for i, score in zip(chunk, chunk_scores, strict=True):
            scores[i] = score
    return scores  # type: ignore[return-value]


def _scores(logits: torch.Tensor, targets: list[list[int]]) -> list[Score]:
    """Each target sequence's summed log-probability and greedy flag, from the logits [tokens, vocab] that predict
    all of them, one after another."""
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    flat = torch.tensor([t for seq in targets for t in seq])
    picked = logprobs[torch.arange(len(flat)), flat]
    greedy = logprobs.argmax(-1) == flat
    out, offset = [], 0
    for seq in targets:
        end = offset + len(seq)
        out.append(Score(picked[offset:end].sum().item(), bool(greedy[offset:end].all()), len(seq)))
        offset = end
    return out


@torch.no_grad()
def score_choices(
    model: Transformer, ctx: list[int], conts: list[list[int]], batch_size: int = 16,
    weights: DecodeWeights | None = None,
) -> list[Score]:  # fmt: skip
    """The continuations of one context (a question's choices): the context goes through the model once, then the
    continuations, `batch_size` at a time, as rows of a batch over the context's cached keys and values (clearlm's
    decoder; `weights`: its `DecodeWeights`, made once per scoring call). The same log-probabilities as scoring each
    (context, continuation) whole, up to float rounding, for a fraction of the work when the context is long
    (TruthfulQA's primer, few-shot prompts)."""
    device = model.embed_tokens.weight.device
    n, width = len(ctx), max(len(c) for c in conts) - 1
    weights = weights or model.decode_weights()
    base = model.new_cache(1, n + width, weights)
    first = model.hidden_cached(torch.tensor([ctx], device=device), torch.arange(n, device=device)[None], base,
                                None)[0, -1:]  # predicts each continuation's first token  # fmt: skip
    scores = []
    for start in range(0, len(conts), batch_size):
        chunk = conts[start : start + batch_size]
        rows = [first] * len(chunk)
        if width:
            cache = [copy.copy(layer) for layer in base]
            for layer in cache:
                layer.repeat(len(chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, cont in enumerate(chunk):
                ids[j, : len(cont) - 1] = torch.tensor(cont[:-1])
            mask = torch.ones(width, n + width, dtype=torch.bool)
            mask[:, n:] = torch.ones(width, width, dtype=torch.bool).tril()  # padding at a row's end is never seen
            positions = (n + torch.arange(width)).expand(len(chunk), width)
            after = model.hidden_cached(ids.to(device), positions.to(device), cache,
                                        mask.to(device).expand(len(chunk), 1, width, n + width))  # fmt: skip
            rows = [torch.cat([first, after[j, : len(cont) - 1]]) for j, cont in enumerate(chunk)]
        scores += _scores(weights.lm_head(torch.cat(rows)), chunk)
    return scores


# Sharing a context costs two model calls per question instead of a share of a batched one: measured on 2 cores it
# paid off from a few hundred saved context tokens (TruthfulQA 2.5x, BBQ 2x faster) and lost below (ARC, PIQA, COPA
# 1.2-2x slower), so shorter shared contexts stay in the sorted, batched windows. Many requests after one short
# context (CrowS-Pairs' sentences all follow the prefix token) save little each: a context is shared only from
# SHARE_CONTEXT tokens.
SHARE_FROM, SHARE_CONTEXT = 256, 32


def score_requests(
    model: nn.Module, encoder: Encoder, requests: list[tuple[str, str]], batch_size: int = 16
) -> list[Score]:
    """Log-probability of each continuation given its context, and whether it is the greedy one. Consecutive
    requests with the same context tokens (a question's choices) are scored over one pass of the context when the
    model is clearlm's decoder, that saves `SHARE_FROM` tokens or more and nothing needs truncating; the rest as
    windows, sorted and batched."""
    max_len = model.cfg.context
    pairs = []
    for context, continuation in requests:
        ctx, cont = encoder.pair(context, continuation)
        if not cont:
            raise InputError(f"continuation {continuation!r} (context ...{context[-40:]!r}) encodes to no tokens")
        pairs.append((ctx, cont))
    scores: list[Score | None] = [None] * len(pairs)
    alone = []
    start = 0
    weights = None  # the decoder's DecodeWeights, made at the first shared context
    while start < len(pairs):
        end = start + 1
        while end < len(pairs) and pairs[end][0] == pairs[start][0]:
            end += 1
        group = pairs[start:end]
        n = len(group[0][0])
        shared = n >= SHARE_CONTEXT and (end - start - 1) * n >= SHARE_FROM  # context tokens not recomputed
        if isinstance(model, Transformer) and shared and all(len(a) + len(b) <= max_len for a, b in group):
            if weights is None:
                model.eval()
                weights = model.decode_weights()
            scores[start:end] = score_choices(model, group[0][0], [b for _, b in group], batch_size, weights)
        else:
            alone += range(start, end)
        start = end
    windows = [((pairs[i][0] + pairs[i][1])[-(max_len + 1) :][:-1], pairs[i][1][-max_len:]) for i in alone]
    for i, score in zip(alone, score_windows(model, windows, batch_size), strict=True):
        scores[i] = score
    return scores  # type: ignore[return-value]
