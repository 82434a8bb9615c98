"""Open a release (or any local Llama-layout folder) as a clearlm model and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from tokenizers import Tokenizer

from clearlm.errors import InputError
from clearlm.model.auto import CausalLM, load_transformers_model
from clearlm.model.hf import load_hf


def load_release(folder: Path) -> tuple[CausalLM, Tokenizer, int | None]:
    """Model, tokenizer and end-of-text id; one-line errors for a folder that is not a model.

    Llama-layout folders load into clearlm's decoder; other architectures through transformers.
    """
    folder = Path(folder)
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: not found (expected a clearlm release or Llama model folder)")
    config = json.loads((folder / "config.json").read_text())
    try:
        model = load_hf(folder) if config.get("model_type") == "llama" else load_transformers_model(folder, config)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, SafetensorError, OSError, ImportError) as e:
        raise InputError(f"{folder}: cannot load the model ({str(e).splitlines()[0]})") from None
    eos = config.get("eos_token_id")
    return model, tok, eos if isinstance(eos, int) else None


def bos_token_id(folder: Path, eos_id: int | None) -> int:
    """lm-eval's prefix token for log-likelihoods: the model's BOS token, else its EOS token."""
    config = json.loads((Path(folder) / "config.json").read_text())
    bos = config.get("bos_token_id")
    if isinstance(bos, int):
        return bos
    if eos_id is None:
        raise InputError(f"{folder}: config.json names neither bos_token_id nor eos_token_id")
    return eos_id
