"""Open a release (or any local Llama-layout folder) as a clearlm model and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from tokenizers import Tokenizer

from clearlm.artifacts import MANIFEST, require_intact
from clearlm.errors import InputError
from clearlm.model.auto import CausalLM, load_transformers_model
from clearlm.model.hf import load_hf

MODEL_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "generation_config.json"})  # fmt: skip


def load_release(folder: Path) -> tuple[CausalLM, Tokenizer, int | None]:
    """Model, tokenizer and end-of-text id; one-line errors for a folder that is not a model.

    Llama-layout folders load into clearlm's decoder; other architectures through transformers.
    """
    folder = Path(folder)
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: not found (expected a clearlm release or Llama model folder)")
    _require_intact(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: expected a JSON object")
    try:
        model = (
            load_hf(folder)
            if config.get("model_type") in ("llama", "olmo2")
            else load_transformers_model(folder, config)
        )
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, SafetensorError, OSError, ImportError) as e:
        raise InputError(f"{folder}: cannot load the model ({str(e).splitlines()[0]})") from None
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise InputError(f"{folder / 'tokenizer.json'}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    eos = config.get("eos_token_id")
    return model, tok, eos if isinstance(eos, int) else None


def _require_intact(folder: Path) -> None:
    """A clearlm release lists every file's sha256 in its manifest: check the files a model is loaded from (not
    its cards, datasets or checkpoints, which a publisher may edit), so a damaged download is named, not scored."""
    if not (folder / MANIFEST).is_file():
        return  # an ordinary model folder
    try:
        outputs = json.loads((folder / MANIFEST).read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{folder / MANIFEST}: unreadable, so the model's files cannot be checked; copy the release "
                         "again, or remove the manifest to load the folder unchecked") from None  # fmt: skip
    if isinstance(outputs, dict) and all(isinstance(v, str) for v in outputs.values()):
        require_intact(folder, outputs, MANIFEST, "the release is damaged: copy it again, or rebuild it (clearlm run)",
                       only=MODEL_FILES.__contains__)  # fmt: skip


def _special_token(folder: Path, name: str) -> str | None:
    """A special token's text from tokenizer_config.json or special_tokens_map.json, as transformers reads it."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((folder / file).read_text()).get(name)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def bos_token_id(folder: Path, eos_id: int | None) -> int:
    """lm-eval's prefix token for log-likelihoods: the tokenizer's BOS token, else its EOS token."""
    folder = Path(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for name in ("bos_token", "eos_token"):
        text = _special_token(folder, name)
        if text is not None and tok.token_to_id(text) is not None:
            return tok.token_to_id(text)
    config = json.loads((folder / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(config.get(key), int):
            return config[key]
    if eos_id is None:
        raise InputError(f"{folder}: names no BOS or EOS token (tokenizer_config.json or config.json)")
    return eos_id
