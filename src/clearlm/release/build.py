"""Assemble the release folder from the artifacts of a run.

Layout (transformers reads the top level and ignores the rest):
  config.json, model.safetensors, generation_config.json   the model, in transformers' Llama layout
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
  README.md          model card with Hugging Face metadata
  recipe.toml        the recipe exactly as run (overrides applied)
  training/log.jsonl the per-step training log
  checkpoints/       intermediate weights (safetensors)
  eval/results.json  evaluation results
  data/data_card.json  the data card's figures: sources, licences, steps, mix, tokens per source
  lineage.json       every upstream artifact: digest, config, environment, output hashes
  manifest.json      written by the artifact store: this folder's digest and file hashes
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tomli_w

from clearlm import __version__
from clearlm.artifacts import Artifact
from clearlm.data.card import tokens_section
from clearlm.data.tokenizer import load_tokenizer
from clearlm.model.hf import save_hf
from clearlm.model.weights import WEIGHTS, load_model
from clearlm.recipe import Recipe
from clearlm.release.card import model_card


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _tokenizer_files(tokenizer_art: Artifact, eos: str, pad: str, out: Path, context: int) -> None:
    shutil.copy2(tokenizer_art.path / "tokenizer.json", out / "tokenizer.json")
    _dump(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos,
            "eos_token": eos,
            "pad_token": pad,
            "model_max_length": context,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        },
    )
    _dump(out / "special_tokens_map.json", {"bos_token": eos, "eos_token": eos, "pad_token": pad})


def build_release(recipe: Recipe, recipe_text: str, artifacts: dict[str, Artifact], out: Path) -> dict[str, Any]:
    data, train, evaluation = artifacts["data"], artifacts["train"], artifacts["eval"]
    tok_cfg = recipe.tokenizer
    tok = load_tokenizer(artifacts["tokenizer"].path)
    eos_id, pad_id = tok.token_to_id(tok_cfg.eos_token), tok.token_to_id(tok_cfg.pad_token)
    model = load_model(train.path)
    save_hf(model, out, bos_id=eos_id, eos_id=eos_id, pad_id=pad_id)
    _dump(out / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    _tokenizer_files(artifacts["tokenizer"], tok_cfg.eos_token, tok_cfg.pad_token, out, model.cfg.context)

    (out / "recipe.toml").write_text(
        f"# Recipe as run by clearlm {__version__}; the original text follows at the end.\n"
        + tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True))
        + "\n# Original recipe:\n"
        + "".join(f"# {line}\n" for line in recipe_text.splitlines())
    )
    (out / "training").mkdir()
    shutil.copy2(train.path / "log.jsonl", out / "training" / "log.jsonl")
    for ckpt in sorted(p for p in (train.path / "checkpoints").glob("step-*") if (p / WEIGHTS).is_file()):
        (out / "checkpoints" / ckpt.name).mkdir(parents=True)
        shutil.copy2(ckpt / WEIGHTS, out / "checkpoints" / ckpt.name / WEIGHTS)
    _dump(out / "eval" / "results.json", evaluation.metrics)
    if (evaluation.path / "samples.jsonl").is_file():
        shutil.copy2(evaluation.path / "samples.jsonl", out / "eval" / "samples.jsonl")
    shards = artifacts["shards"].metrics
    tokens = {split: shards[split].get("sources", {}) for split in ("train", "validation")}
    _dump(out / "data" / "data_card.json", {**data.metrics, "tokens": tokens})
    card = (data.path / "data_card.md").read_text()
    (out / "data" / "data_card.md").write_text(card + tokens_section(shards))
    shutil.copy2(data.path / "lengths.png", out / "data" / "lengths.png")
    _dump(
        out / "lineage.json",
        {name: {**art.ref(), **{k: art.manifest[k] for k in ("config", "inputs", "outputs", "environment", "created")}}
         for name, art in artifacts.items()},
    )  # fmt: skip

    ctx = {
        "name": recipe.release.name or recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "data": data.metrics,
        "train": train.metrics,
        "eval": evaluation.metrics,
        "parameters": model.num_params(),
        "vocab_size": model.cfg.vocab_size,
        "clearlm_version": __version__,
    }
    (out / "README.md").write_text(model_card(ctx))
    return {
        "name": ctx["name"],
        "parameters": ctx["parameters"],
        "lineage": {k: a.digest for k, a in artifacts.items()},
    }
