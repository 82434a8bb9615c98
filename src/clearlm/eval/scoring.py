"""Log-likelihood of continuations, tokenised and windowed exactly as lm-evaluation-harness does.

A request is (context, continuation). As in lm-eval's HF model: trailing spaces of the context move
to the continuation; the pair is encoded whole and the context alone, and the continuation tokens
are the whole encoding past the context's; an empty context becomes the prefix token; the input is
the last `context + 1` tokens minus one. Differences from lm-eval are only in speed: requests are
sorted by length and batched, and only the continuation positions go through the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from clearlm.errors import InputError
from clearlm.model.transformer import Transformer


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
        rows, cols, targets = [], [], []
        for row, i in enumerate(chunk):
            inp, cont = windows[i]
            ids[row, : len(inp)] = torch.tensor(inp)
            rows += [row] * len(cont)
            cols += range(len(inp) - len(cont), len(inp))
            targets += cont
        logprobs = F.log_softmax(_logits_at(model, ids.to(device), rows, cols).float(), dim=-1).cpu()
        target_t = torch.tensor(targets)
        picked = logprobs[torch.arange(len(targets)), target_t]
        greedy = logprobs.argmax(-1) == target_t
        offset = 0
        for i in chunk:
            n = len(windows[i][1])
            scores[i] = Score(picked[offset : offset + n].sum().item(), bool(greedy[offset : offset + n].all()), n)
            offset += n
    return scores  # type: ignore[return-value]


def score_requests(
    model: nn.Module, encoder: Encoder, requests: list[tuple[str, str]], batch_size: int = 16
) -> list[Score]:
    """Log-probability of each continuation given its context, and whether it is the greedy one."""
    max_len = model.cfg.context
    windows = []
    for context, continuation in requests:
        ctx, cont = encoder.pair(context, continuation)
        if not cont:
            raise InputError(f"continuation {continuation!r} (context ...{context[-40:]!r}) encodes to no tokens")
        windows.append(((ctx + cont)[-(max_len + 1) :][:-1], cont[-max_len:]))
    return score_windows(model, windows, batch_size)
