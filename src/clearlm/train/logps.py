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


def answer_logps(model: Transformer, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each answer token's log-probability (the logits divided by `temperature`, as TRL's GRPO scores samples),
    flat in row-major order (each row's answer in order), and the row each belongs to."""
    idx, targets = answer_rows(prompts, answers, pad_id)
    scored = targets != IGNORE_INDEX
    logits = model.lm_head(model.hidden_states(idx)[scored]).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.log_softmax(-1).gather(1, targets[scored].unsqueeze(-1)).squeeze(-1)
    return picked, scored.nonzero()[:, 0]
