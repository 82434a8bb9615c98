"""Sampling text from a model: temperature, top-k and a seed for reproducible samples."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from clearlm.model.auto import CausalLM


@torch.no_grad()
def generate(
    model: CausalLM,
    tok: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    stop_id: int | None = None,
    stop_strings: list[str] = (),
    add_special_tokens: bool = False,
) -> str:
    """The prompt's continuation (without the prompt), cut before the first stop string.

    temperature 0 means greedy decoding.
    """
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    stop_strings = [s for s in stop_strings if s]
    prompt_ids = tok.encode(prompt, add_special_tokens=add_special_tokens).ids
    if not prompt_ids and stop_id is not None:
        prompt_ids = [stop_id]
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.cfg.context :])[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if next_id == stop_id:
            break
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
        if stop_strings and any(s in tok.decode(new) for s in stop_strings):
            break
    text = tok.decode(new)
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text
