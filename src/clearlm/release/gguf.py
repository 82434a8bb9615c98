"""A release (or any Llama / OLMo 2 folder with a byte-level BPE tokenizer) as one GGUF file that llama.cpp runs.

Written with the `gguf` package (llama.cpp's own writer) as llama.cpp's `convert_hf_to_gguf.py` writes these two
architectures: its tensor names (`gguf.get_tensor_name_map`), Llama's query and key rows permuted to the interleaved
rotary layout llama.cpp computes for `llama` (OLMo 2 keeps transformers' halves: llama.cpp's `olmo2` rotates them
so), norms kept in float32 whatever the weights' type, and the vocabulary as a GPT-2 byte-level BPE: tokens, merges,
types (special tokens are control tokens) and the `gpt-2` pre-tokenizer, the one whose split equals the tokenizers
library's `ByteLevel` split. A tokenizer llama.cpp would split differently is refused rather than exported wrong.
The output layer is always written (a tied one as a copy of the embedding), which both architectures load. The chat
template goes in without transformers' `{% generation %}` markers, which render nothing and which jinja2 refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clearlm.errors import InputError
from clearlm.model.hf import to_hf_state_dict
from clearlm.model.transformer import Transformer
from clearlm.release.load import load_release

GGUFType = Literal["f32", "f16", "q8_0"]
_ARCHITECTURES = {"llama": "LLAMA", "olmo2": "OLMO2"}


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def byte_level_vocabulary(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (padded to the model's vocabulary with unused `[PADn]` tokens), their GGUF token types, and the
    merges, from a tokenizer.json that llama.cpp's `gpt-2` pre-tokenizer reproduces; one-line error otherwise."""
    gguf = _require_gguf()
    path = folder / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a tokenizers JSON file ({e})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    pre = spec.get("pre_tokenizer") if isinstance(spec, dict) else None
    why = None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        why = f"its model is {model.get('type') if isinstance(model, dict) else model!r}, not BPE"
    elif spec.get("normalizer") is not None:
        why = "it has a normalizer"
    elif not (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") in (False, None)
              and pre.get("use_regex", True) is True):  # fmt: skip
        why = f"its pre-tokenizer is {json.dumps(pre)[:200]}, not GPT-2's byte-level split"
    if why:
        raise InputError(f"{path}: llama.cpp's gpt-2 tokenizer would not split text as this one does ({why})")
    try:
        tokens: dict[int, str] = {int(i): str(t) for t, i in model["vocab"].items()}
        special = set()
        for added in spec.get("added_tokens") or []:
            tokens[int(added["id"])] = str(added["content"])
            if added.get("special"):
                special.add(int(added["id"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise InputError(f"{path}: malformed vocabulary or merges ({type(e).__name__}: {e})") from None
    if not tokens or min(tokens) < 0 or max(tokens) >= vocab_size:
        raise InputError(f"{path}: token ids must lie in the model's vocabulary of {vocab_size}")
    names, types = [], []
    for i in range(vocab_size):
        if i in tokens:
            names.append(tokens[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            names.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return names, [int(t) for t in types], merges


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary halves per head -> llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: Transformer, arch: Any) -> list[tuple[str, np.ndarray]]:
    """GGUF names and float32 arrays, Llama's q/k permuted; the output layer always present."""
    gguf = _require_gguf()
    cfg = model.cfg
    names = gguf.get_tensor_name_map(arch, cfg.n_layers)
    state = to_hf_state_dict(model)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    out = []
    for hf_name, tensor in state.items():
        data = tensor.float().numpy()
        if not cfg.olmo2 and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, cfg.n_heads)
        elif not cfg.olmo2 and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, cfg.kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise InputError(f"{hf_name}: no GGUF name for this tensor of a {cfg.architecture} model")
        out.append((name, np.ascontiguousarray(data)))
    return out


def _encoded(gguf: Any, name: str, data: np.ndarray, dtype: GGUFType) -> tuple[np.ndarray, Any]:
    """The tensor in the file's type: norms (1-D) stay float32, as llama.cpp's converter keeps them; q8_0 needs rows
    of whole 32-value blocks (a tensor without them is stored as f16)."""
    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, kind), kind
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(folder: Path, out: Path, dtype: GGUFType = "f32") -> dict[str, Any]:
    """Write `folder`'s model, tokenizer and chat template to `out` (atomically: a killed export leaves no file that
    looks finished); what was written."""
    gguf = _require_gguf()
    folder = Path(folder)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # load_release names what is wrong with the file
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
        if kind not in _ARCHITECTURES:  # refused before a foreign model is loaded for nothing
            raise InputError(f"{folder}: GGUF export supports Llama and OLMo 2 folders, not {kind!r}")
    model, _, _ = load_release(folder)
    assert isinstance(model, Transformer)
    cfg = model.cfg
    arch = getattr(gguf.MODEL_ARCH, _ARCHITECTURES[cfg.architecture])
    tokens, types, merges = byte_level_vocabulary(folder, cfg.vocab_size)
    partial = out.with_name(out.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    hyperparameters = {  # the writer's `add_<key>` for each: llama.cpp's `<arch>.<key>` metadata
        "name": folder.resolve().name, "context_length": cfg.context, "embedding_length": cfg.d_model,
        "block_count": cfg.n_layers, "feed_forward_length": cfg.hidden_dim, "head_count": cfg.n_heads,
        "head_count_kv": cfg.kv_heads, "key_length": cfg.head_dim, "value_length": cfg.head_dim,
        "rope_dimension_count": cfg.head_dim, "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
    }  # fmt: skip
    for key, value in hyperparameters.items():
        getattr(writer, f"add_{key}")(value)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # fmt: skip
    writer.add_file_type(file_types[dtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=cfg.vocab_size)
    special.merges = merges
    if isinstance(special.chat_template, str):  # transformers' assistant-mask markers: no text, unknown to jinja2
        special.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", special.chat_template)
    special.add_to_gguf(writer, quiet=True)  # merges, bos/eos/pad ids, the chat template
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)  # clearlm prepends nothing; llama.cpp must not either
    count, written = 0, 0
    for name, data in _tensors(model, arch):
        encoded, kind = _encoded(gguf, name, data, dtype)
        writer.add_tensor(name, encoded, raw_dtype=kind)
        count, written = count + 1, written + encoded.nbytes
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"file": str(out), "architecture": cfg.architecture, "type": dtype, "tensors": count,
            "tensor_bytes": written, "tokens": len(tokens), "merges": len(merges),
            "chat_template": special.chat_template is not None}  # fmt: skip
