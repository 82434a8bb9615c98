"""Mid-training (OLMo 2's second stage) and its model soup; continued pretraining of a model folder.

Three stages (`clearlm.stages`): `mid_data` cleans and splits the `[midtrain]` mix like `[data]`, `mid_shards`
tokenises it with the base model's tokenizer (the recipe's, or a folder's with the recipe's end-of-text, padding
and chat tokens added, as post-training adds them), and `midtrain` trains one ingredient per seed, each from the
same base weights (and, from pretraining, its optimizer state unless `optimizer = "fresh"`) on its own data order
with the learning rate warmed up then annealed linearly to zero, then averages the ingredients (a uniform soup).
An ingredient is pretraining's loop with other settings, so it checkpoints, resumes bit for bit and runs under
torchrun as pretraining does. Bits per byte on the mix's validation split, per domain, before (the base) and
after (the soup and each ingredient), go into the card and the report.
"""

from __future__ import annotations

import json
import shutil
from html import escape
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from clearlm.data.corpus import build_corpus
from clearlm.data.documents import read_jsonl
from clearlm.data.shards import write_shards
from clearlm.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from clearlm.errors import ArtifactError
from clearlm.eval.run import score
from clearlm.model.transformer import Transformer
from clearlm.model.weights import MODEL_CONFIG, WEIGHTS, load_model, tied
from clearlm.recipe import Recipe, TrainConfig
from clearlm.stages import StageRun
from clearlm.train import checkpoint
from clearlm.train.checkpoint_files import latest_checkpoint
from clearlm.train.loop import LOG, pretrain, read_log
from clearlm.train.post_setup import add_special_tokens, base_model

INGREDIENTS = "ingredients"


def from_folder(recipe: Recipe) -> bool:
    """Whether mid-training continues a model folder's pretraining rather than this recipe's."""
    return recipe.midtrain.base != "pretrain"


def train_config(recipe: Recipe) -> TrainConfig:
    """An ingredient's training settings: `[train]`'s, with mid-training's steps, batch and learning rate, and a
    warmup then a linear decay to zero (warmup-stable-decay whose decay starts when the warmup ends)."""
    mid, train = recipe.midtrain, recipe.train
    return train.model_copy(update={
        "max_steps": mid.max_steps, "micro_batch_size": mid.micro_batch_size or train.micro_batch_size,
        "grad_accum_steps": mid.grad_accum_steps or train.grad_accum_steps, "lr": mid.lr or train.lr,
        "warmup_steps": mid.warmup_steps, "schedule": "wsd", "min_lr_ratio": 0.0,
        "decay_fraction": (mid.max_steps - mid.warmup_steps) / mid.max_steps,
        "checkpoint_interval": mid.checkpoint_interval, "spike_factor": mid.spike_factor, "keep_optimizer": "last",
    })  # fmt: skip


def build_data(run: StageRun, out: Path) -> dict[str, Any]:
    """The `mid_data` stage: the mix, cleaned and split as the data stage does (finished parts kept)."""
    return build_corpus(run.recipe.midtrain.data, run.base_dir, out, run.reporter.data_progress)


def _tokenizer(run: StageRun) -> Tokenizer:
    """The base model's tokenizer, reading text as corpus text (special-token strings stay plain)."""
    if not from_folder(run.recipe):
        return load_tokenizer(run.inputs["tokenizer"].path)
    tok = Tokenizer.from_file(str(run.base_dir / run.recipe.midtrain.base / TOKENIZER_FILE))
    add_special_tokens(tok, run.recipe.tokenizer)
    tok.encode_special_tokens = True
    return tok


def build_shards(run: StageRun, out: Path) -> dict[str, Any]:
    """The `mid_shards` stage: the mix's splits as token shards, documents ended by the recipe's end-of-text."""
    tok = _tokenizer(run)
    return write_shards(tok, tok.token_to_id(run.recipe.tokenizer.eos_token), run.inputs["mid_data"].path, out)


def _base(run: StageRun) -> tuple[Transformer, Tokenizer, Path | None]:
    """The base model and its tokenizer, and the pretraining checkpoint whose optimizer state to continue."""
    cfg = run.recipe.midtrain
    if from_folder(run.recipe):
        model, tok = base_model(run.base_dir / cfg.base, run.recipe.tokenizer, "midtrain.base")
        return model, tok, None
    train = run.inputs["train"]
    found = latest_checkpoint(train.path / "checkpoints") if cfg.optimizer == "continue" else None
    if cfg.optimizer == "continue" and found is None:
        raise ArtifactError(f"{train.path / 'checkpoints'}: no checkpoint with optimizer state to continue; set "
                            'midtrain.optimizer = "fresh"')  # fmt: skip
    return load_model(train.path), load_tokenizer(run.inputs["tokenizer"].path), found


def _starter(weights: dict[str, torch.Tensor], optimizer_from: Path | None) -> Any:
    """What an ingredient starts from: the base weights, and pretraining's optimizer state with mid-training's
    own settings (learning rate, decay) kept."""

    def start(model: Transformer, opt: torch.optim.Optimizer) -> None:
        if optimizer_from is not None:
            settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            checkpoint.load_checkpoint(optimizer_from, model, opt)
            for group, own in zip(opt.param_groups, settings, strict=True):
                group.update(own)
        state = dict(weights)
        if tied(model):
            state["lm_head.weight"] = state["embed_tokens.weight"]
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))

    return start


def _bits_per_byte(model: Transformer, tok: Tokenizer, run: StageRun) -> dict[str, Any]:
    """Bits per byte per domain of the mix's validation split, scored as the eval stage scores a corpus."""
    docs = read_jsonl(run.inputs["mid_data"].path / "validation.jsonl")
    eos_id = tok.token_to_id(run.recipe.tokenizer.eos_token)
    cfg = run.recipe.eval
    _, bpb, _ = score(model, tok, eos_id, eos_id, specs=[], data_dirs=[], corpora={"mix": docs}, num_fewshot=0,
                      limit=None, batch_size=cfg.batch_size, max_documents=cfg.max_documents_per_domain)  # fmt: skip
    return bpb["mix"]


def _finished(folder: Path) -> bool:
    """An ingredient whose weights and config were both written (the config last) on an earlier run."""
    try:
        return isinstance(json.loads((folder / MODEL_CONFIG).read_text()), dict)
    except (OSError, ValueError):
        return False


def soup(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The uniform mean of the ingredients' weights."""
    states = [load_file(folder / WEIGHTS) for folder in folders]
    return {name: torch.stack([s[name] for s in states]).mean(dim=0) for name in states[0]}


def build_stage(run: StageRun, out: Path) -> dict[str, Any] | None:
    """The `midtrain` stage: every ingredient (resumed where it stopped), then the soup; None when stopped."""
    recipe, shards = run.recipe, run.inputs["mid_shards"]
    model, tok, optimizer_from = _base(run)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied(model)}
    before = _bits_per_byte(model, tok, run) if run.world.main else {}
    cfg, ingredients = train_config(recipe), []
    for k, seed in enumerate(recipe.midtrain.seeds):
        folder = out / INGREDIENTS / f"seed-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        # `stop_after` counts the stage's steps: the ingredients' one after the other
        stop = None if run.stop_after is None else run.stop_after - k * cfg.max_steps
        if stop is not None and stop <= 0:
            return None
        if not _finished(folder):
            metrics = pretrain(recipe, shards.path, shards.metrics, model.cfg.vocab_size, folder, resume=run.resume,
                               stop_after=stop if stop is not None and stop < cfg.max_steps else None,
                               on_step=run.reporter.train_step, on_note=run.reporter.note,
                               w=run.world, cfg=cfg, seed=seed, model_cfg=model.cfg,
                               start=_starter(weights, optimizer_from), section="midtrain")  # fmt: skip
            if "stopped_at" in metrics:
                return None
        ingredients.append(folder)
    if not run.world.main:
        return {}
    save_file(soup(ingredients), str(out / WEIGHTS))
    shutil.copy2(ingredients[0] / MODEL_CONFIG, out / MODEL_CONFIG)
    tok.encode_special_tokens = False  # saved as the tokenizer stage saves its own
    tok.save(str(out / TOKENIZER_FILE))
    with open(out / LOG, "w") as f:  # every ingredient's steps, each record naming its seed
        for seed, folder in zip(recipe.midtrain.seeds, ingredients, strict=True):
            f.writelines(json.dumps({"seed": seed, **r}) + "\n" for r in read_log(folder / LOG))
    each = {str(seed): _bits_per_byte(load_model(folder), tok, run)
            for seed, folder in zip(recipe.midtrain.seeds, ingredients, strict=True)}  # fmt: skip
    return {"ingredients": [f"{INGREDIENTS}/{f.name}" for f in ingredients], "seeds": recipe.midtrain.seeds,
            "steps": cfg.max_steps, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
            "tokens": cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum_steps * model.cfg.context,
            "optimizer": "fresh" if optimizer_from is None else "continued from pretraining",
            "bits_per_byte_before": before, "bits_per_byte_after": _bits_per_byte(load_model(out), tok, run),
            "bits_per_byte_ingredients": each, "licenses": run.inputs["mid_data"].metrics["licenses"],
            "world_size": run.world.size}  # fmt: skip


def card_lines(recipe: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """The model card's account: base, mix, schedule, ingredients, and bits per byte before and after."""
    mid = recipe["midtrain"]
    base = "this model's pretraining" if mid["base"] == "pretrain" else f"the model folder `{mid['base']}`"
    sources = ", ".join(f"{name} ({lic})" for name, lic in m["licenses"].items())
    rows = [f"| {d} | {b['bits_per_byte']:.4f} | {m['bits_per_byte_after'][d]['bits_per_byte']:.4f} | "
            + " | ".join(f"{m['bits_per_byte_ingredients'][str(s)][d]['bits_per_byte']:.4f}" for s in m["seeds"]) + " |"
            for d, b in m["bits_per_byte_before"].items()]  # fmt: skip
    header = " | ".join(f"seed {s}" for s in m["seeds"])
    return [
        "## Mid-training", "",
        f"Continued from {base} on {sources}: {len(m['seeds'])} runs (seeds {', '.join(map(str, m['seeds']))}, one "
        f"data order each) of {m['steps']} steps, learning rate {m['lr']} after {m['warmup_steps']} warmup steps "
        f"annealed linearly to 0, optimizer {m['optimizer']}; the released weights are the runs' uniform mean (a "
        "model soup). Each run's weights are in `midtraining/ingredients/`, their steps in `midtraining/log.jsonl`.",
        "", "Bits per byte on the mid-training mix's validation split (lower is better):", "",
        f"| domain | before | after (soup) | {header} |", "|---|---|---|" + "---|" * len(m["seeds"]), *rows, "",
    ]  # fmt: skip


def report_section(recipe: dict[str, Any], m: dict[str, Any], log: list[dict[str, Any]] | None) -> list[str]:
    """The report's section: each ingredient's loss curve and the bits per byte before and after."""
    from clearlm.release.report import bar_chart, line_chart

    losses = {f"seed {s}": [(r["step"], r["loss"]) for r in log or [] if r.get("seed") == s and "loss" in r]
              for s in m["seeds"]}  # fmt: skip
    domains = list(m["bits_per_byte_before"])
    series = {"before": [m["bits_per_byte_before"][d]["bits_per_byte"] for d in domains],
              "after (soup)": [m["bits_per_byte_after"][d]["bits_per_byte"] for d in domains]}  # fmt: skip
    return [
        "<h2>Mid-training</h2>",
        f"<p>{len(m['seeds'])} runs of {m['steps']} steps on the mid-training mix, learning rate "
        f"{escape(str(m['lr']))} annealed linearly to 0; the released weights are their uniform mean.</p>",
        line_chart("Mid-training loss, per run", losses),
        bar_chart("Mid-training validation bits per byte (lower is better)", domains, series),
    ]  # fmt: skip
