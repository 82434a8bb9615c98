"""clearlm's own model files: `model.safetensors` (clearlm names) beside `model_config.json`.

The train artifact and every checkpoint use this layout; stages that need a trained model (eval,
release) read it through here rather than through the training code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clearlm.model.transformer import Transformer, TransformerConfig

WEIGHTS, MODEL_CONFIG = "model.safetensors", "model_config.json"


def save_state(state: dict[str, torch.Tensor], path: Path, tied: bool) -> None:
    """Tensors under clearlm's names, written atomically; a tied output layer is stored once, as the
    embedding (safetensors forbids shared tensors)."""
    tensors, seen = {}, set()
    for name, tensor in state.items():
        if (tied and name == "lm_head.weight") or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to("cpu").contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def tied(model: nn.Module) -> bool:
    """Whether the model shares its embedding with its output layer (stored once, as the embedding)."""
    return bool(getattr(getattr(model, "cfg", None), "tie_embeddings", False))


def save_weights(model: nn.Module, path: Path) -> None:
    save_state(model.state_dict(), path, tied(model))


def load_weights(model: nn.Module, path: Path) -> None:
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    shared = {"lm_head.weight"} if tied(model) else set()
    if set(missing) - shared or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def save_model(model: Transformer, folder: Path) -> None:
    save_weights(model, folder / WEIGHTS)
    (folder / MODEL_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")


def load_model(folder: Path, weights: Path | None = None) -> Transformer:
    """The model saved in `folder` (or the same architecture with other `weights`), on CPU."""
    model = Transformer(TransformerConfig(**json.loads((folder / MODEL_CONFIG).read_text())))
    load_weights(model, weights or folder / WEIGHTS)
    return model
