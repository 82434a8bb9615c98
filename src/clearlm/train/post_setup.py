"""Where SFT, DPO and RLVR (and mid-training from a folder) start: the model and tokenizer (an earlier stage's, or a
model folder's with the chat tokens added), and their data rows, bad ones counted and listed."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from clearlm.data.chat import BadRow
from clearlm.data.instructions import LICENSE as INSTRUCTIONS_LICENSE
from clearlm.data.sources import post_training_sources
from clearlm.data.tokenizer import load_tokenizer, own_tokenizer
from clearlm.errors import RecipeError
from clearlm.eval.results import write_samples
from clearlm.model.transformer import Transformer
from clearlm.model.weights import load_model
from clearlm.recipe import ChatDataConfig, DPOConfig, PromptDataConfig, RLVRConfig, SFTConfig, TokenizerConfig
from clearlm.release.load import load_release
from clearlm.stages import StageRun, base_stage
from clearlm.train.trained import origin

_FIELD_PREFIX = re.compile(r"^\w+(\[\d+\])?: ")  # "messages[2]: role must be ..." counts as "role must be ..."


def read_rows(
    data: list[tuple[ChatDataConfig | PromptDataConfig, Path]], reader: Callable[[Path], Any], out: Path
) -> tuple[list[Any], list[dict[str, str]], dict[str, int]]:  # fmt: skip
    """Good rows of every (recipe entry, file) and where each came from; bad ones go to `out/rejects.jsonl` with file,
    line and reason, and are counted."""
    rows, origins, bad, rejects = [], [], Counter(), []
    for entry, file in data:
        for where, row in reader(file):
            if isinstance(row, BadRow):
                bad[_FIELD_PREFIX.sub("", str(row))] += 1
                rejects.append({"where": where, "reason": str(row)})
            else:
                rows.append(row)
                origins.append(origin(entry.path, entry.license, where.removeprefix(str(file))))
    write_samples(out / "rejects.jsonl", rejects)
    return rows, origins, dict(bad)


def licences(cfg: SFTConfig | DPOConfig | RLVRConfig) -> dict[str, str]:
    found = {d.path: d.license for d in cfg.data}
    if cfg.builtin:
        found[cfg.builtin] = INSTRUCTIONS_LICENSE
    return found


def add_special_tokens(tok: Tokenizer, tok_cfg: TokenizerConfig) -> list[str]:
    """Add the recipe's end-of-text, padding and chat tokens that a folder's tokenizer lacks; returns them."""
    missing = [t for t in (tok_cfg.eos_token, tok_cfg.pad_token, *tok_cfg.special_tokens) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return missing


def base_model(folder: Path, tok_cfg: TokenizerConfig, key: str) -> tuple[Transformer, Tokenizer]:
    """A Llama-family model folder to post-train. Chat tokens its tokenizer lacks are added as special
    tokens, and the embeddings grow to match (new rows at the mean of the old ones). `key` names the recipe
    setting in errors."""
    model, tok, _ = load_release(folder)
    if not isinstance(model, Transformer):
        raise RecipeError(f"{key}: {folder}: only Llama-family model folders can be post-trained")
    if missing := add_special_tokens(tok, tok_cfg):
        model.grow_vocab(tok.get_vocab_size(), [tok.token_to_id(t) for t in missing])
    return model, tok


def starting_model(run: StageRun, section: str) -> tuple[Transformer, Tokenizer]:
    """Where post-training starts: an earlier stage's model (with the recipe's tokenizer), or a folder's."""
    cfg = getattr(run.recipe, section)
    stage = base_stage(run.recipe, cfg.base, section)
    if stage is None:
        return base_model(run.base_dir / cfg.base, run.recipe.tokenizer, f"{section}.base")
    art = run.inputs[stage]
    tok_dir = art.path if own_tokenizer(art.path) else run.inputs["tokenizer"].path
    return load_model(art.path), load_tokenizer(tok_dir)


def stage_start(
    run: StageRun, section: str, reader: Callable[[Path], Any], builtin: Callable[[Path, int], list[Any]],
    builtin_count: int, out: Path,
) -> tuple[Transformer, Tokenizer, list[Any], list[dict[str, str]], dict[str, int]]:  # fmt: skip
    """What a post-training stage starts from: its model and tokenizer, its rows (the built-in set made from the
    corpus first, when the recipe asks for it) and where each came from, bad rows counted and listed in
    `out/rejects.jsonl`."""
    cfg = getattr(run.recipe, section)
    model, tok = starting_model(run, section)
    files, _ = post_training_sources(cfg, run.base_dir, run.recipe.tokenizer)
    rows, origins, bad = read_rows(list(zip(cfg.data, files, strict=True)), reader, out)
    if cfg.builtin:
        made = builtin(run.inputs["data"].path / "train.jsonl", builtin_count)
        rows = made + rows
        origins = [origin(cfg.builtin, INSTRUCTIONS_LICENSE, f":{i}") for i in range(1, len(made) + 1)] + origins
    return model, tok, rows, origins, bad
