"""Any causal LM folder that transformers can load, behind the small interface evaluation needs.

clearlm's own decoder serves Llama-layout folders; for other architectures (GPT-2, OLMo 2, Qwen, ...)
this wraps `transformers.AutoModelForCausalLM`, loaded offline from the folder, never with remote
code. transformers is only needed for such folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clearlm.model.transformer import Transformer


@dataclass(frozen=True)
class _Limits:
    context: int


class TransformersCausalLM(nn.Module):
    """`model(ids) -> logits` and `cfg.context`, like clearlm's Transformer."""

    def __init__(self, hf: Any, context: int) -> None:
        super().__init__()
        self.hf = hf
        self.cfg = _Limits(context)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits


CausalLM = Transformer | TransformersCausalLM


def load_transformers_model(folder: Path, config: dict[str, Any]) -> TransformersCausalLM:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError(
            f"{folder} is a {config.get('model_type')!r} model: evaluating it needs `pip install transformers`"
        ) from None
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    context = next(
        (config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length") if k in config), 2048
    )
    return TransformersCausalLM(hf.eval(), int(context))
