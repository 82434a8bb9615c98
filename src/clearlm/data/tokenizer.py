"""Tokenizer stage: byte-level BPE trained with Hugging Face `tokenizers`, saved as `tokenizer.json`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from clearlm.data.documents import read_jsonl
from clearlm.recipe import TokenizerConfig
from clearlm.stages import StageRun

TOKENIZER_FILE = "tokenizer.json"


def own_tokenizer(model_dir: Path) -> bool:
    """Whether a model folder holds its tokenizer: post-training stages save theirs (with the chat tokens they
    added) beside the weights; a pretrained model uses the tokenizer stage's."""
    return (model_dir / TOKENIZER_FILE).is_file()


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    """Special tokens in id order: end-of-text first, then padding, then the reserved ones."""
    return list(dict.fromkeys([cfg.eos_token, cfg.pad_token, *cfg.special_tokens]))


def _texts(path: Path) -> Iterator[str]:
    for doc in read_jsonl(path):
        yield doc["text"]


def train_tokenizer(cfg: TokenizerConfig, train_jsonl: Path, out: Path) -> dict[str, Any]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=special_tokens(cfg),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(train_jsonl), trainer=trainer)
    tok.save(str(out / TOKENIZER_FILE))
    return {"vocab_size": tok.get_vocab_size(), "special_tokens": special_tokens(cfg)}


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer for corpus text: special-token strings in the text stay plain text.

    A document that mentions `<|endoftext|>` must not get an end-of-text id in the middle; only
    clearlm itself inserts special ids (between documents, in chat templates).
    """
    file = path / TOKENIZER_FILE if path.is_dir() else path
    tok = Tokenizer.from_file(str(file))
    tok.encode_special_tokens = True
    return tok


def build_stage(run: StageRun, out: Path) -> dict[str, Any]:
    """The tokenizer stage: byte-level BPE trained on the training split."""
    return train_tokenizer(run.recipe.tokenizer, run.inputs["data"].path / "train.jsonl", out)
