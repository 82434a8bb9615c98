"""Reinforcement learning with verifiable rewards (Tulu 3's third stage): GRPO on completions the generation engine
samples from the current policy, rewarded by verifiers.

Each generation batch takes `prompts_per_step` prompts (a permutation of the training prompts fixed by (seed,
epoch), as SFT orders its examples) and samples `num_generations` completions of each with a seed of (seed, batch),
then makes `num_iterations` optimizer steps over them (`grpo.py`). Every completion, with its prompt, gold fields,
each verifier's reward, the total and its advantage, is kept in `completions.jsonl`, so anyone can recompute what the
model was rewarded for. A run stopped at a generation batch's end resumes from its checkpoint with the steps the
uninterrupted run takes: the model, the optimizer and the seeds decide every sample.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from clearlm.data.chat import ChatTemplate, encode_prompt
from clearlm.data.documents import hold_out
from clearlm.data.instructions import stdlib_function_prompts
from clearlm.data.prompts import read_prompts
from clearlm.errors import TrainingError
from clearlm.eval.results import write_samples
from clearlm.model.generate import Completion, Sampling, generate
from clearlm.model.transformer import Transformer
from clearlm.model.weights import save_model
from clearlm.recipe import RLVRConfig
from clearlm.stages import StageRun
from clearlm.train import checkpoint, checkpoint_files
from clearlm.train.grpo import Advantages, LossSettings, advantages, nanstd, policy_loss, token_logps, total_rewards
from clearlm.train.guard import LossGuard
from clearlm.train.loop import clip_gradients, read_log, truncate_log
from clearlm.train.optim import build_optimizer
from clearlm.train.post_setup import licences, stage_start
from clearlm.train.posttrain import lr_at
from clearlm.train.trained import write_trained
from clearlm.verifiers import Verifier, load, score


@dataclass(frozen=True)
class Prompt:
    row: dict[str, Any]  # as given: `prompt` (text or messages) and the verifiers' fields
    ids: list[int]
    index: int  # its place among the stage's rows, for its provenance


@dataclass
class Rollout:
    """One generation batch: each completion's prompt and tokens (the end-of-text token included when it ended
    there, as TRL scores it), and its advantage; old and reference log-probabilities per micro-batch when used."""

    prompts: list[list[int]]
    completions: list[list[int]]
    adv: Advantages
    old: list[torch.Tensor] | None = None
    ref: list[torch.Tensor] | None = None

    def micro_batches(self, size: int) -> list[slice]:
        return [slice(i, i + size) for i in range(0, len(self.completions), size)]

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def settings(cfg: RLVRConfig) -> LossSettings:
    high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    return LossSettings(
        cfg.loss_type, cfg.epsilon, high, cfg.beta, cfg.max_completion_length, cfg.use_bias_correction_kl
    )


@torch.no_grad()
def fixed_logps(model: Transformer, rollout: Rollout, micro_batch_size: int, temperature: float, pad_id: int
                ) -> list[torch.Tensor]:  # fmt: skip
    """Log-probabilities under `model` as it is now, per micro-batch: the old policy's (several passes over one
    generation batch) or the reference's (a KL penalty)."""
    return [token_logps(model, rollout.prompts[s], rollout.completions[s], temperature, pad_id)[0]
            for s in rollout.micro_batches(micro_batch_size)]  # fmt: skip


def optimization_pass(model: Transformer, rollout: Rollout, loss: LossSettings, micro_batch_size: int,
                      temperature: float, pad_id: int) -> dict[str, float]:  # fmt: skip
    """Backward over the whole generation batch, micro-batch by micro-batch (the optimizer steps after it): the
    step's loss (the sum of the micro-batches' shares, as TRL logs it) and the mean of their metrics."""
    parts = rollout.micro_batches(micro_batch_size)
    total, sums = 0.0, Counter()
    for i, part in enumerate(parts):
        logps, mask = token_logps(model, rollout.prompts[part], rollout.completions[part], temperature, pad_id)
        value, metrics = policy_loss(
            logps, rollout.old[i] if rollout.old else None, rollout.ref[i] if rollout.ref else None,
            rollout.adv.advantages[part], mask, loss, micro_batches=len(parts), batch_tokens=float(rollout.tokens),
        )  # fmt: skip
        value.backward()
        total += value.item()
        sums.update(metrics)
    return {"loss": total, **{k: v / len(parts) for k, v in sums.items()}}


def reward_metrics(adv: Advantages, per_verifier: torch.Tensor, names: list[str]) -> dict[str, float]:
    """TRL's reward statistics: the total's mean and standard deviation, each verifier's, and the share of
    completions whose group had no reward variance."""
    out = {"reward": torch.nanmean(adv.rewards).item(), "reward_std": nanstd(adv.rewards).item(),
           "frac_reward_zero_std": adv.zero_std.float().mean().item()}  # fmt: skip
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(per_verifier[:, i]).item()
        out[f"rewards/{name}/std"] = nanstd(per_verifier[:, i]).item()
    return {k: (None if math.isnan(v) else v) for k, v in out.items()}


def prepare_prompts(rows: list[dict[str, Any]], tok: Tokenizer, template: ChatTemplate, room: int
                    ) -> tuple[list[Prompt], Counter[str]]:  # fmt: skip
    """Tokenized prompts; those that leave no room for a completion in the context are dropped and counted."""
    kept, counts = [], Counter()
    for index, row in enumerate(rows):
        ids = encode_prompt(tok, template, row["prompt"])
        if not ids:
            counts["dropped: empty prompt"] += 1
        elif len(ids) > room:
            counts["dropped: prompt longer than the context less max_completion_length"] += 1
        else:
            kept.append(Prompt(row, ids, index))
    counts["prompts"] = len(kept)
    return kept, counts


class Sampler:
    """Completions of prompts from the policy, decoded as TRL decodes them (special tokens skipped)."""

    def __init__(self, tok: Tokenizer, eos_id: int, cfg: RLVRConfig) -> None:
        self.tok, self.eos_id, self.cfg = tok, eos_id, cfg

    def __call__(self, model: Transformer, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        return generate(model, prompts, max_new_tokens=self.cfg.max_completion_length, sampling=sampling,
                        eos_ids=[self.eos_id], batch_size=len(prompts),
                        decode=lambda ids: self.tok.decode(ids, skip_special_tokens=True))  # fmt: skip

    def tokens(self, completion: Completion) -> list[int]:
        """What the loss scores: the new tokens, and the end-of-text token when generation ended on it."""
        return completion.tokens + ([self.eos_id] if completion.finish == "eos" else [])


def _seed(seed: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"rlvr:{seed}:{batch}".encode()).digest()[:8], "big") & (2**63 - 1)


def held_out_reward(model: Transformer, held: list[Prompt], verifiers: list[Verifier], sample: Sampler
                    ) -> dict[str, Any]:  # fmt: skip
    """Mean reward of one greedy completion per held-out prompt, in total and per verifier."""
    if not held:
        return {}
    done = sample(model, [p.ids for p in held], Sampling())
    per, errors = score(verifiers, [c.text for c in done], [p.row for p in held])
    matrix = torch.tensor(per, dtype=torch.float64)
    total = total_rewards(matrix, torch.tensor([v.weight for v in verifiers], dtype=torch.float64))
    out: dict[str, Any] = {"prompts": len(held), "reward": torch.nanmean(total).item()}
    out["per_verifier"] = {v.name: torch.nanmean(matrix[:, i]).item() for i, v in enumerate(verifiers)}
    if errors:
        out["verifier_errors"] = dict(errors)
    return out


def _order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _batch_prompts(n: int, per_batch: int, seed: int, batch: int) -> list[int]:
    """The prompts of generation batch `batch`: the next `per_batch` of the epochs' permutations."""
    out, position = [], batch * per_batch
    while len(out) < per_batch:
        epoch, k = divmod(position, n)
        out.append(_order(n, seed, epoch)[k])
        position += 1
    return out


def trained_prompts(n: int, cfg: RLVRConfig, seed: int) -> list[int]:
    """The prompts the run's generation batches sample, each once, in the order first sampled: what the trace index
    holds (a run shorter than an epoch never sees the others)."""
    batches = range(cfg.max_steps // cfg.num_iterations)
    return list(dict.fromkeys(i for b in batches for i in _batch_prompts(n, cfg.prompts_per_step, seed, b)))


def train_rlvr(
    model: Transformer, prompts: list[Prompt], verifiers: list[Verifier], cfg: RLVRConfig, seed: int, pad_id: int,
    sample: Sampler, out: Path, on_step: Callable[[dict[str, Any]], None] | None = None, *, resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Train `model` in place; per-step log `out/log.jsonl`, every completion in `out/completions.jsonl`; None when
    `stop_after` stopped the run (rounded up to a generation batch's end)."""
    if not prompts:
        raise TrainingError("no RL prompt is left to train on (see the counts of dropped prompts)")
    torch.manual_seed(seed)
    opt = build_optimizer(model, cfg)
    # the KL penalty's reference is the starting model: copied before a resume loads later weights
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta else None
    mu, total = cfg.num_iterations, cfg.max_steps
    ckpt_root, log_path, samples_path = out / "checkpoints", out / "log.jsonl", out / "completions.jsonl"
    start = 0
    found = checkpoint_files.latest_checkpoint(ckpt_root) if resume else None
    if found:
        start = checkpoint.load_checkpoint(found, model, opt)["step"]
        truncate_log(log_path, start)
        truncate_log(samples_path, start)
    else:
        for path in (log_path, samples_path):
            path.unlink(missing_ok=True)
    end = min(total, mu * math.ceil(stop_after / mu)) if stop_after else total
    end = max(start, end)
    guard = LossGuard(cfg.spike_factor, "rlvr", read_log(log_path) if found else [], ckpt_root)
    loss_cfg, names = settings(cfg), [v.name for v in verifiers]
    weights = torch.tensor([v.weight for v in verifiers])
    for batch in range(start // mu, end // mu):
        chosen = [prompts[i] for i in _batch_prompts(len(prompts), cfg.prompts_per_step, seed, batch)]
        rows = [p.row for p in chosen for _ in range(cfg.num_generations)]
        ids = [p.ids for p in chosen for _ in range(cfg.num_generations)]
        started = time.perf_counter()
        model.eval()
        done = sample(model, ids, Sampling(cfg.temperature, cfg.top_k, cfg.top_p, _seed(seed, batch)))
        generated = sum(len(c.tokens) for c in done)
        generation_s = time.perf_counter() - started
        texts = [c.text for c in done]
        per, errors = score(verifiers, texts, rows)
        per_verifier = torch.tensor(per, dtype=torch.float32)
        rollout = Rollout(ids, [sample.tokens(c) for c in done],
                          advantages(per_verifier, weights, cfg.num_generations, cfg.scale_rewards))  # fmt: skip
        if mu > 1:
            rollout.old = fixed_logps(model, rollout, cfg.micro_batch_size, cfg.temperature, pad_id)
        if reference is not None:
            rollout.ref = fixed_logps(reference, rollout, cfg.micro_batch_size, cfg.temperature, pad_id)
        lengths = torch.tensor([float(len(c)) for c in rollout.completions])
        generation = {
            **reward_metrics(rollout.adv, per_verifier, names),
            "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": sum(c.finish == "length" for c in done) / len(done),
            "empty_completions": sum(not t.strip() for t in texts), "verifier_errors": sum(errors.values()),
            "generation_tokens_per_s": generated / max(generation_s, 1e-9),
        }  # fmt: skip
        write_samples(samples_path, [
            {"step": batch * mu + 1, "prompt": row["prompt"], "gold": {k: v for k, v in row.items() if k != "prompt"},
             "completion": text, "finish": c.finish, "rewards": dict(zip(names, [None if math.isnan(x) else x
                                                                               for x in r], strict=True)),
             "reward": None if math.isnan(total_r) else total_r, "advantage": a}
            for row, text, c, r, total_r, a in zip(rows, texts, done, per, rollout.adv.rewards.tolist(),
                                                   rollout.adv.advantages.tolist(), strict=True)
        ], append=True)  # fmt: skip
        if errors:
            generation["verifier_error_kinds"] = dict(errors)
        model.train()
        for iteration in range(mu):
            step = batch * mu + iteration
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            metrics = optimization_pass(model, rollout, loss_cfg, cfg.micro_batch_size, cfg.temperature, pad_id)
            grad_norm = clip_gradients(model, cfg.grad_clip)
            guard.check(step + 1, metrics["loss"], grad_norm, lr, lambda: f"generation batch {batch + 1}")  # noqa: B023
            opt.step()
            opt.zero_grad(set_to_none=True)
            record = {"step": step + 1, "generation_batch": batch + 1, "iteration": iteration + 1, **metrics,
                      "lr": lr, "grad_norm": grad_norm, **generation,
                      "train_tokens_per_s": rollout.tokens / (time.perf_counter() - started)}  # fmt: skip
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_step:
                on_step({**record, "max_steps": total})
        done_steps = (batch + 1) * mu
        if cfg.checkpoint_interval and done_steps % cfg.checkpoint_interval == 0 and done_steps < end:
            checkpoint.save_checkpoint(ckpt_root, done_steps, model, opt, {"step": done_steps}, keep_optimizer=False)
    model.eval()
    if end < total:
        checkpoint.save_checkpoint(ckpt_root, end, model, opt, {"step": end}, keep_optimizer=True)
        return None
    shutil.rmtree(ckpt_root, ignore_errors=True)
    log = read_log(log_path)
    firsts = [r for r in log if r["iteration"] == 1]
    n = max(1, len(firsts) // 10)
    return {"steps": total, "generation_batches": total // mu, "prompts": len(prompts),
            "first_reward": sum(r["reward"] or 0.0 for r in firsts[:n]) / n,
            "final_reward": sum(r["reward"] or 0.0 for r in firsts[-n:]) / n,
            "empty_completions": sum(r["empty_completions"] for r in firsts),
            "verifier_errors": sum(r["verifier_errors"] for r in firsts)}  # fmt: skip


def build_stage(run: StageRun, out: Path) -> dict[str, Any] | None:
    """The `[rlvr]` stage: GRPO from its base on its prompts, rewarded by its verifiers; None when `stop_after`
    stopped it (continue with `resume`)."""
    cfg, tok_cfg = run.recipe.rlvr, run.recipe.tokenizer
    model, tok, rows, origins, bad = stage_start(run, "rlvr", read_prompts, stdlib_function_prompts,
                                                 cfg.builtin_prompts, out)  # fmt: skip
    verifiers = [load(v.name, v.weight, v.function, run.base_dir) for v in cfg.verifiers]
    room = model.cfg.context - cfg.max_completion_length
    if room < 1:
        raise TrainingError(f"rlvr.max_completion_length {cfg.max_completion_length} leaves no room for a prompt in "
                            f"the model's context of {model.cfg.context}")  # fmt: skip
    prompts, counts = prepare_prompts(rows, tok, ChatTemplate(eos_token=tok_cfg.eos_token), room)
    train, held = hold_out(prompts, lambda p: p.row, cfg.held_out_fraction)  # by a hash of the row, as DPO's
    pad_id, eos_id = tok.token_to_id(tok_cfg.pad_token), tok.token_to_id(tok_cfg.eos_token)
    sample = Sampler(tok, eos_id, cfg)
    before_path = out / "held_out_before.json"
    if run.resume and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = held_out_reward(model, held, verifiers, sample)
        before_path.with_suffix(".tmp").write_text(json.dumps(before) + "\n")
        os.replace(before_path.with_suffix(".tmp"), before_path)
    metrics = train_rlvr(model, train, verifiers, cfg, run.recipe.seed, pad_id, sample, out, run.reporter.train_step,
                         resume=run.resume, stop_after=run.stop_after)  # fmt: skip
    if metrics is None:
        return None
    after = held_out_reward(model, held, verifiers, sample)
    save_model(model, out)
    tok.save(str(out / "tokenizer.json"))
    sampled = (train[i] for i in trained_prompts(len(train), cfg, run.recipe.seed))
    trained = write_trained(out, ((p.ids, origins[p.index]) for p in sampled), eos_id)
    return {**metrics, "counts": dict(counts), "bad_rows": bad, "held_out_before": before, "held_out_after": after,
            "verifiers": {v.name: v.weight for v in verifiers}, "licenses": licences(cfg),
            "trained": trained}  # fmt: skip


def card_lines(recipe: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """The model card's account: verifiers, GRPO settings, and the held-out mean reward before and after."""
    r = recipe["rlvr"]
    verifiers = ", ".join(f"`{name}` (weight {w:g})" for name, w in m["verifiers"].items())
    before, after = m["held_out_before"], m["held_out_after"]
    lines = [
        "## Reinforcement learning with verifiable rewards", "",
        f"GRPO (TRL's definition, loss `{r['loss_type']}`) from `{r['base']}` on {m['prompts']} prompts "
        f"({', '.join(m['licenses'])}), {r['num_generations']} sampled completions per prompt at temperature "
        f"{r['temperature']}, {m['steps']} optimizer steps over {m['generation_batches']} generation batches; rewards "
        f"from {verifiers}. Every completion, its rewards and advantage are in `post_training/rlvr_completions.jsonl`.",
    ]  # fmt: skip
    if before:
        lines += ["", f"Mean reward of a greedy completion on {before['prompts']} held-out prompts: "
                  f"{before['reward']:.4f} before, {after['reward']:.4f} after.", ""]  # fmt: skip
    return lines


def report_section(recipe: dict[str, Any], m: dict[str, Any], log: list[dict[str, Any]] | None) -> list[str]:
    """The report's section: the reward per generation batch, and the held-out reward before and after."""
    from clearlm.release.report import bar_chart, line_chart

    firsts = [rec for rec in log or [] if rec.get("iteration") == 1 and rec.get("reward") is not None]
    curves = {"mean reward": [(rec["step"], rec["reward"]) for rec in firsts]}
    for name in m["verifiers"]:
        key = f"rewards/{name}/mean"
        curves[name] = [(rec["step"], rec[key]) for rec in firsts if rec.get(key) is not None]
    out = ["<h2>Reinforcement learning with verifiable rewards</h2>",
           f"<p>GRPO ({escape(recipe['rlvr']['loss_type'])}) over {m['generation_batches']} generation batches; "
           "rewards from " + escape(", ".join(m["verifiers"])) + ".</p>",
           line_chart("Reward per generation batch (sampled completions)", curves)]  # fmt: skip
    if m["held_out_before"]:
        out.append(bar_chart("Held-out mean reward, greedy (higher is better)", ["before", "after"],
                             {"reward": [m["held_out_before"]["reward"], m["held_out_after"]["reward"]]}))  # fmt: skip
    return out
