"""Conversion between clearlm's decoder and a Hugging Face `LlamaForCausalLM` or `Olmo2ForCausalLM` folder.

The export writes `config.json` and `model.safetensors` with transformers' parameter names, so
`AutoModelForCausalLM.from_pretrained(folder)` loads it offline; the import reads such a folder
(single or sharded safetensors) back into clearlm's `Transformer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clearlm.model.transformer import Transformer, TransformerConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


_HF_CLASSES = {"llama": "LlamaForCausalLM", "olmo2": "Olmo2ForCausalLM"}


def hf_config(cfg: TransformerConfig, bos_id: int, eos_id: int, pad_id: int | None) -> dict[str, Any]:
    return {
        "architectures": [_HF_CLASSES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        **({} if cfg.olmo2 else {"mlp_bias": False}),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    if hf.get("model_type") not in _HF_CLASSES:
        raise ValueError(
            f"model_type {hf.get('model_type')!r} is not supported (expected one of {', '.join(_HF_CLASSES)})"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention or MLP biases are not supported")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported yet")
    rope_theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        architecture=hf["model_type"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"),
        d_ff=hf["intermediate_size"],
        context=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """transformers' names are clearlm's under a `model.` prefix; a tied lm_head is not stored."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.cfg.tie_embeddings:
                out[name] = tensor
        else:
            out[f"model.{name}"] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: TransformerConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clearlm's state dict from transformers' Llama names (rotary buffers are recomputed)."""
    out = {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def save_hf(model: Transformer, folder: Path, bos_id: int, eos_id: int, pad_id: int | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(to_hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(hf_config(model.cfg, bos_id, eos_id, pad_id), indent=2) + "\n")


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / WEIGHTS
    if single.is_file():
        return load_file(str(single))
    index = folder / (WEIGHTS + ".index.json")
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} or {index.name}")
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        sd |= load_file(str(folder / shard))
    return sd


def load_hf(folder: Path) -> Transformer:
    """A clearlm Transformer from a Llama folder (config.json + safetensors), on CPU in float32."""
    cfg = config_from_hf(json.loads((folder / CONFIG).read_text()))
    model = Transformer(cfg)
    sd = from_hf_state_dict(cfg, {k: v.float() for k, v in _load_weights(folder).items()})
    model.load_state_dict(sd, strict=True)
    return model
