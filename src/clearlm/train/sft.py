"""Supervised fine-tuning: tokenised conversations into batches (padded or packed) and the loss.

The loss is TRL's SFTTrainer's: next-token cross-entropy summed over the trained tokens (assistant
turns; completions for prompt-completion data) and divided by the number of trained tokens in the
whole accumulated batch, so micro-batching never changes it. Packing puts several examples in one
row with positions restarting and attention kept inside each example, so packed and padded batches
give the same loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from clearlm.data.chat import ChatTemplate, Example, read_sft, tokenize_sft
from clearlm.data.instructions import stdlib_function_examples
from clearlm.errors import TrainingError
from clearlm.model.loss import IGNORE_INDEX
from clearlm.model.transformer import Transformer
from clearlm.model.weights import save_model
from clearlm.recipe import SFTConfig
from clearlm.stages import StageRun
from clearlm.train.post_setup import licences, stage_start
from clearlm.train.posttrain import length_groups, run_steps
from clearlm.train.trained import write_trained


@dataclass(frozen=True)
class Tokenized:
    """An example's ids (as trained: truncated) and targets (labels shifted by one); `row` is its place among the
    stage's rows."""

    ids: list[int]
    targets: list[int]
    row: int

    @property
    def inputs(self) -> list[int]:
        """What the model reads: the ids without the last one."""
        return self.ids[:-1]

    @property
    def length(self) -> int:
        """How many tokens the model reads (`len(inputs)`, without the copy)."""
        return len(self.ids) - 1

    @property
    def trained(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass(frozen=True)
class Batch:
    idx: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor | None = None

    @property
    def trained(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def prepare(examples: Iterable[Example], tok: Tokenizer, template: ChatTemplate, max_length: int
            ) -> tuple[list[Tokenized], Counter[str]]:  # fmt: skip
    """Tokenise and keep the first `max_length` tokens (TRL's keep_start); examples left with no trained
    token are dropped. The counts say how many were truncated or dropped, so nothing is silent."""
    out, counts = [], Counter()
    for row, example in enumerate(examples):
        ids, labels = tokenize_sft(tok, template, example)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            counts["truncated"] += 1
        item = Tokenized(ids, labels[1:], row)
        if item.trained == 0:
            counts["dropped: no trained token within max_length"] += 1
            continue
        out.append(item)
        counts["examples"] += 1
    return out, counts


def pad(items: list[Tokenized], pad_id: int) -> Batch:
    """Rows padded on the right (targets -100 there), as TRL's collator does."""
    width = max(i.length for i in items)
    idx = torch.full((len(items), width), pad_id, dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        idx[row, : item.length] = torch.tensor(item.inputs)
        targets[row, : len(item.targets)] = torch.tensor(item.targets)
    return Batch(idx, targets)


def pack(items: list[Tokenized], width: int, pad_id: int) -> Batch:
    """Examples placed in order into rows of `width` tokens (a new row when the next does not fit)."""
    rows: list[list[Tokenized]] = [[]]
    for item in items:
        if item.length > width:
            raise ValueError(f"an example of {item.length} tokens does not fit a row of {width}")
        if sum(i.length for i in rows[-1]) + item.length > width:
            rows.append([])
        rows[-1].append(item)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, item in enumerate(row):
            n = item.length
            idx[r, at : at + n] = torch.tensor(item.inputs)
            targets[r, at : at + n] = torch.tensor(item.targets)
            segments[r, at : at + n] = s
            at += n
        segments[r, at:] = len(row)  # padding: a segment of its own
    return Batch(idx, targets, segments)


def loss_sum(model: Transformer, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's trained tokens (divide by the accumulated token count)."""
    return model.loss_sum(batch.idx, batch.targets, batch.segments)


def mean_loss(model: Transformer, micro_batches: list[Batch]) -> float:
    """The loss TRL logs for one optimizer step: token mean over all micro-batches (no gradient)."""
    with torch.no_grad():
        total = sum(loss_sum(model, b).item() for b in micro_batches)
    return total / max(1, sum(b.trained for b in micro_batches))


def step_backward(model: Transformer, chosen: list[Tokenized], cfg: SFTConfig, width: int, pad_id: int
                  ) -> dict[str, float]:  # fmt: skip
    """One step's backward over `chosen` (the gradients accumulate in `model`): passes of similar lengths (or packed
    rows of `width`), each pass's summed loss divided by the whole step's trained tokens; its loss and token counts."""
    if cfg.packing:
        groups = [chosen[i : i + cfg.micro_batch_size] for i in range(0, len(chosen), cfg.micro_batch_size)]
        batches = [pack(g, width, pad_id) for g in groups]
    else:
        groups = [[chosen[k] for k in g] for g in length_groups([c.length for c in chosen], cfg.micro_batch_size)]
        batches = [pad(g, pad_id) for g in groups]
    n_trained = sum(b.trained for b in batches)
    total = 0.0
    for batch in batches:
        loss = loss_sum(model, batch)
        (loss / n_trained).backward()
        total += loss.item()
    return {"loss": total / n_trained, "trained_tokens": n_trained, "tokens": sum(b.idx.numel() for b in batches)}


def train_sft(
    model: Transformer,
    items: list[Tokenized],
    cfg: SFTConfig,
    seed: int,
    pad_id: int,
    out: Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Fine-tune `model` in place on `items`; per-step log in `out/log.jsonl`; None when stopped early."""
    if not items:
        raise TrainingError("no SFT example is left to train on (see the counts of dropped examples)")
    width = min(cfg.max_length or model.cfg.context, model.cfg.context) - 1

    def step(indices: list[int]) -> dict[str, float]:
        return step_backward(model, [items[i] for i in indices], cfg, width, pad_id)

    result = run_steps(model, len(items), cfg, seed, out, step, resume=resume, stop_after=stop_after, on_step=on_step)
    return None if result is None else {**result, "examples": len(items)}


def build_stage(run: StageRun, out: Path) -> dict[str, Any] | None:
    """The `[sft]` stage: its chat data (and the built-in set made from the corpus), fine-tuned from its base;
    None when `stop_after` stopped it (continue with `resume`)."""
    cfg, tok_cfg = run.recipe.sft, run.recipe.tokenizer
    model, tok, examples, origins, bad = stage_start(run, "sft", read_sft, stdlib_function_examples,
                                                     cfg.builtin_examples, out)  # fmt: skip
    max_length = min(cfg.max_length or model.cfg.context, model.cfg.context)
    items, counts = prepare(examples, tok, ChatTemplate(eos_token=tok_cfg.eos_token), max_length)
    metrics = train_sft(model, items, cfg, run.recipe.seed, tok.token_to_id(tok_cfg.pad_token), out,
                        run.reporter.train_step, resume=run.resume, stop_after=run.stop_after)  # fmt: skip
    if metrics is None:
        return None
    save_model(model, out)
    tok.save(str(out / "tokenizer.json"))
    trained = write_trained(out, ((i.ids, origins[i.row]) for i in items), tok.token_to_id(tok_cfg.eos_token))
    return {**metrics, "counts": dict(counts), "bad_rows": bad, "licenses": licences(cfg), "trained": trained}
