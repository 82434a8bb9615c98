"""Log-probabilities of answer tokens after their prompts: what DPO sums per answer and GRPO keeps per token.

The rows are prompt + answer, right-padded, the last token left out; the targets are the answer tokens at the
positions that predict them. The output layer runs only at those positions: prompts (often half the tokens) need
hidden states, not logits.
"""

from __future__ import annotations

import torch

from clearlm.model.loss import IGNORE_INDEX
from clearlm.model.transformer import Transformer


def answer_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [rows, width] and targets (IGNORE_INDEX off the answers)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)) - 1
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids = prompt + answer
        idx[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, len(prompt) - 1 : len(ids) - 1] = torch.tensor(answer)
    return idx, targets


def shared_prompt_states(model: Transformer, prompts: list[list[int]], answers: list[list[int]], pad_id: int
                         ) -> torch.Tensor:  # fmt: skip
    """The hidden states that predict each answer token, flat in row-major order, with each distinct prompt run once
    for all the rows that share it (`Transformer.shared_prefix_states`): the last prompt token's, then the answer's
    own but its last."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(row)
    states: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for prompt, rows in groups.items():
        inputs = [answers[r][:-1] for r in rows]  # an answer's last token predicts nothing
        ids = torch.full((len(rows), max(map(len, inputs))), pad_id, dtype=torch.long)
        for i, row_inputs in enumerate(inputs):
            ids[i, : len(row_inputs)] = torch.tensor(row_inputs, dtype=torch.long)
        head, tail = model.shared_prefix_states(torch.tensor(prompt), ids)
        for i, r in enumerate(rows):
            states[r] = torch.cat([head[-1:], tail[i, : len(inputs[i])]])[: len(answers[r])]
    return torch.cat(states)


def answer_logps(model: Transformer, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                 temperature: float = 1.0, *, share_prompts: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each answer token's log-probability (the logits divided by `temperature`, as TRL's GRPO scores samples),
    flat in row-major order (each row's answer in order), and the row each belongs to. `share_prompts` runs each
    distinct prompt once for the rows that repeat it (GRPO's groups of completions) instead of once per row."""
    if share_prompts:
        hidden = shared_prompt_states(model, prompts, answers, pad_id)
        targets = torch.tensor([t for a in answers for t in a], dtype=torch.long)
        rows = torch.repeat_interleave(torch.tensor([len(a) for a in answers]))
    else:
        idx, padded = answer_rows(prompts, answers, pad_id)
        scored = padded != IGNORE_INDEX
        hidden, targets, rows = model.hidden_states(idx)[scored], padded[scored], scored.nonzero()[:, 0]
    logits = model.lm_head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(1, targets.unsqueeze(-1)).squeeze(-1), rows
