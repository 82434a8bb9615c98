"""Preference tuning: DPO (sigmoid), IPO, length-normalised DPO (Tulu 3's `dpo_norm`, TRL's
`sigmoid_norm`) and SimPO, with TRL's definitions.

A sequence's log-probability is the sum over its answer tokens of log p(token | everything before).
The reference model's log-probabilities are computed once, before training, and kept (in the stage's
artifact); the reference model is not held in memory while training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from clearlm.data.chat import ChatTemplate, Pair, tokenize_pair
from clearlm.data.chat import read_preferences as read_pair_file
from clearlm.data.documents import hold_out
from clearlm.data.instructions import stdlib_function_pairs
from clearlm.errors import RecipeError, TrainingError
from clearlm.model.transformer import Transformer
from clearlm.model.weights import save_model
from clearlm.recipe import DPOConfig
from clearlm.stages import StageRun
from clearlm.train.logps import answer_logps
from clearlm.train.post_setup import base_model, licences, stage_start
from clearlm.train.posttrain import length_groups, run_steps
from clearlm.train.trained import write_trained


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    row: int  # its place among the stage's rows, for its provenance


def truncate(pairs: list[TokenizedPair], max_length: int) -> tuple[list[TokenizedPair], dict[str, int]]:
    """TRL's keep_start: prompt+answer cut to `max_length`; pairs whose prompt alone fills it are dropped."""
    out, counts = [], {"pairs": 0, "truncated": 0, "dropped: prompt fills max_length": 0}
    for p in pairs:
        if len(p.prompt) >= max_length:
            counts["dropped: prompt fills max_length"] += 1
            continue
        room = max_length - len(p.prompt)
        if len(p.chosen) > room or len(p.rejected) > room:
            counts["truncated"] += 1
        out.append(TokenizedPair(p.prompt, p.chosen[:room], p.rejected[:room], p.row))
        counts["pairs"] += 1
    return out, counts


def sequence_logps(model: Transformer, pairs: list[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probabilities, each [pairs]."""
    prompts = [p.prompt for p in pairs] * 2
    picked, rows = answer_logps(model, prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    sums = torch.zeros(len(prompts), dtype=picked.dtype).index_add(0, rows, picked)
    return sums[: len(pairs)], sums[len(pairs) :]


def pair_length(pair: TokenizedPair) -> int:
    """The tokens a pair's longer row holds (prompt and answer)."""
    return len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))


def answer_lengths(pairs: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([float(len(p.chosen)) for p in pairs]).clamp(min=1),
            torch.tensor([float(len(p.rejected)) for p in pairs]).clamp(min=1))  # fmt: skip


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor],
    cfg: DPOConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the pairs and TRL's metrics (rewards are beta x the summed log-ratios; SimPO's
    are beta x the policy's mean log-probability per token)."""
    beta = cfg.beta
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    len_c, len_r = lengths
    if cfg.loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif cfg.loss == "ipo":
        losses = (chosen_ratio / len_c - rejected_ratio / len_r - 1 / (2 * beta)) ** 2
    elif cfg.loss == "sigmoid_norm":
        losses = -F.logsigmoid(beta * (chosen_ratio / len_c - rejected_ratio / len_r))
    else:  # simpo: reference-free, length-normalised, with a target margin
        losses = -F.logsigmoid(beta * (chosen / len_c - rejected / len_r - cfg.simpo_gamma / beta))
    if cfg.loss == "simpo":
        reward_c, reward_r = beta * chosen.detach() / len_c, beta * rejected.detach() / len_r
    else:
        reward_c, reward_r = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": reward_c.mean().item(),
        "rewards/rejected": reward_r.mean().item(),
        "rewards/accuracies": (reward_c > reward_r).float().mean().item(),
        "rewards/margins": (reward_c - reward_r).mean().item(),
        "logps/chosen": chosen.detach().mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
    }
    return losses.mean(), metrics


@torch.no_grad()
def reference_logps(model: Transformer, pairs: list[TokenizedPair], pad_id: int, batch: int = 16
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(chosen, rejected) summed answer log-probabilities of every pair, [pairs] each, scored in batches of similar
    lengths."""
    model.eval()
    chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))
    for group in length_groups([pair_length(p) for p in pairs], batch, rows_each=2):
        chosen[group], rejected[group] = sequence_logps(model, [pairs[k] for k in group], pad_id)
    return chosen, rejected


def split_held_out(
    pairs: list[tuple[Pair, TokenizedPair]], fraction: float
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train, held out) by a hash of each pair's text (`documents.hold_out`)."""
    train, held = hold_out(pairs, lambda pt: [pt[0].prompt, pt[0].chosen, pt[0].rejected], fraction)
    return [t for _, t in train], [t for _, t in held]


def preference_accuracy(model: Transformer, pairs: list[TokenizedPair], pad_id: int) -> dict[str, float]:
    """Share of pairs whose chosen answer the model scores higher: summed log-probability ("acc") and
    per token ("acc_norm"), ties counting as wrong, as `clearlm eval --preferences` scores them."""
    if not pairs:
        return {}
    chosen, rejected = reference_logps(model, pairs, pad_id)
    len_c, len_r = answer_lengths(pairs)
    return {"acc": (chosen > rejected).float().mean().item(),
            "acc_norm": (chosen / len_c > rejected / len_r).float().mean().item(), "pairs": len(pairs)}  # fmt: skip


def step_backward(model: Transformer, pairs: list[TokenizedPair], indices: list[int], ref: tuple[torch.Tensor,
                  torch.Tensor], cfg: DPOConfig, pad_id: int) -> dict[str, float]:  # fmt: skip
    """One step's backward over the pairs at `indices` (the gradients accumulate in `model`), in passes of pairs of
    similar lengths; the step's loss is the mean over its pairs, and so are the metrics returned with it."""
    sums: dict[str, float] = {"tokens": 0.0}
    for group in length_groups([pair_length(pairs[j]) for j in indices], cfg.micro_batch_size, rows_each=2):
        part = [indices[k] for k in group]
        batch = [pairs[j] for j in part]
        chosen, rejected = sequence_logps(model, batch, pad_id)
        loss, metrics = dpo_loss(chosen, rejected, ref[0][part], ref[1][part], answer_lengths(batch), cfg)
        (loss * len(part) / len(indices)).backward()
        for k, v in {"loss": loss.item(), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v * len(part) / len(indices)
        sums["tokens"] += sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in batch)
    return sums


def train_dpo(
    model: Transformer,
    pairs: list[TokenizedPair],
    ref: tuple[torch.Tensor, torch.Tensor],
    cfg: DPOConfig,
    seed: int,
    pad_id: int,
    out: Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Tune `model` in place; each step's loss is the mean over its pairs (all micro-batches)."""
    if not pairs:
        raise TrainingError("no preference pair is left to train on (see the counts of dropped pairs)")

    def step(indices: list[int]) -> dict[str, float]:
        return step_backward(model, pairs, indices, ref, cfg, pad_id)

    result = run_steps(model, len(pairs), cfg, seed, out, step, resume=resume, stop_after=stop_after, on_step=on_step)
    if result is None:
        return None
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return {**result, "pairs": len(pairs), "final_reward_accuracy": last["rewards/accuracies"]}


def _reference_and_before(
    run: StageRun, model: Transformer, tok: Tokenizer, train_pairs: list[TokenizedPair], held: list[TokenizedPair],
    pad_id: int, out: Path,
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, float]]:  # fmt: skip
    """The reference's log-probabilities of the training pairs and the held-out accuracy before training:
    computed once and stored in the stage's folder (both written under temporary names, then renamed, so a
    resume never reads half a file), and read back on resume."""
    cfg = run.recipe.dpo
    cache, before_path = out / "reference_logps.safetensors", out / "held_out_before.json"
    cached = load_file(cache) if run.resume and cache.is_file() and before_path.is_file() else None
    if cached is not None and cached["chosen"].shape[0] == len(train_pairs):
        return (cached["chosen"], cached["rejected"]), json.loads(before_path.read_text())
    reference = model
    if cfg.reference:
        reference, ref_tok = base_model(run.base_dir / cfg.reference, run.recipe.tokenizer, "dpo.reference")
        if ref_tok.get_vocab() != tok.get_vocab():
            raise RecipeError(f"dpo.reference: {cfg.reference}: its tokenizer differs from the policy's")
    ref = reference_logps(reference, train_pairs, pad_id)
    before = preference_accuracy(model, held, pad_id)
    save_file({"chosen": ref[0], "rejected": ref[1]}, str(cache) + ".tmp")
    before_path.with_suffix(".tmp").write_text(json.dumps(before) + "\n")
    os.replace(str(cache) + ".tmp", cache)
    os.replace(before_path.with_suffix(".tmp"), before_path)
    return ref, before


def build_stage(run: StageRun, out: Path) -> dict[str, Any] | None:
    """The `[dpo]` stage: preference tuning of its base against a reference whose log-probabilities are computed
    once; None when `stop_after` stopped it."""
    cfg, tok_cfg = run.recipe.dpo, run.recipe.tokenizer
    model, tok, pairs, origins, bad = stage_start(run, "dpo", read_pair_file, stdlib_function_pairs,
                                                  cfg.builtin_pairs, out)  # fmt: skip
    template = ChatTemplate(eos_token=tok_cfg.eos_token)
    tokenized = [(p, TokenizedPair(*tokenize_pair(tok, template, p), row=i)) for i, p in enumerate(pairs)]
    empty = sum(1 for _, t in tokenized if not t.prompt)
    train_pairs, held = split_held_out([(p, t) for p, t in tokenized if t.prompt], cfg.held_out_fraction)
    max_length = min(cfg.max_length or model.cfg.context, model.cfg.context)
    train_pairs, counts = truncate(train_pairs, max_length)
    held, _ = truncate(held, max_length)
    counts["dropped: empty prompt"] = empty
    pad_id = tok.token_to_id(tok_cfg.pad_token)
    ref, before = _reference_and_before(run, model, tok, train_pairs, held, pad_id, out)
    metrics = train_dpo(model, train_pairs, ref, cfg, run.recipe.seed, pad_id, out, run.reporter.train_step,
                        resume=run.resume, stop_after=run.stop_after)  # fmt: skip
    if metrics is None:
        return None
    after = preference_accuracy(model, held, pad_id)
    save_model(model, out)
    tok.save(str(out / "tokenizer.json"))
    sequences = ((p.prompt + answer, {**origins[p.row], "part": part})
                 for p in train_pairs for part, answer in (("chosen", p.chosen), ("rejected", p.rejected)))  # fmt: skip
    trained = write_trained(out, sequences, tok.token_to_id(tok_cfg.eos_token))
    return {**metrics, "counts": counts, "bad_rows": bad, "held_out_before": before, "held_out_after": after,
            "licenses": licences(cfg), "trained": trained}  # fmt: skip
