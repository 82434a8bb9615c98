"""Preference accuracy (RewardBench-style): does the model give the chosen answer a higher score?

Scores are log-probabilities of each answer given the prompt, summed and per token; with a reference
model, the implicit DPO reward log p(answer) - log p_ref(answer) is compared too (its sign does not
depend on beta). Ties count as wrong, as in RewardBench.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clearlm.data.chat import split_transcripts
from clearlm.errors import InputError
from clearlm.eval.metrics import mean_and_stderr
from clearlm.eval.scoring import Encoder, score_requests
from clearlm.model.auto import CausalLM


def read_preferences(path: Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from prompt/chosen/rejected rows or HH chosen/rejected transcripts."""
    if not path.is_file():
        raise InputError(f"{path}: preference file not found")
    triples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object")
            for field in ("chosen", "rejected"):
                if not isinstance(row.get(field), str):
                    raise InputError(f"{where}: field {field!r} is missing or not a string")
            if "prompt" in row:
                if not isinstance(row["prompt"], str):
                    raise InputError(f"{where}: field 'prompt' must be a string")
                triples.append((row["prompt"], row["chosen"], row["rejected"]))
            else:
                try:
                    triples.append(split_transcripts(row["chosen"], row["rejected"]))
                except ValueError as e:
                    raise InputError(f"{where}: {e}") from None
    if not triples:
        raise InputError(f"{path}: no preference pairs")
    return triples


def preference_accuracy(
    model: CausalLM,
    encoder: Encoder,
    triples: list[tuple[str, str, str]],
    *,
    reference: CausalLM | None = None,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-pair rows. Pairs whose answer encodes to no tokens are skipped and counted."""
    usable = [t for t in triples if encoder.pair(t[0], t[1])[1] and encoder.pair(t[0], t[2])[1]]
    requests = [(p, answer) for p, c, r in usable for answer in (c, r)]
    scores = score_requests(model, encoder, requests, batch_size)
    ref_scores = score_requests(reference, encoder, requests, batch_size) if reference is not None else None
    rows, columns = [], {"accuracy": [], "accuracy_norm": [], "accuracy_dpo": []}
    for i in range(len(usable)):
        c, r = scores[2 * i], scores[2 * i + 1]
        row = {"chosen_logprob": c.logprob, "rejected_logprob": r.logprob,
               "chosen_tokens": c.n_tokens, "rejected_tokens": r.n_tokens}  # fmt: skip
        columns["accuracy"].append(float(c.logprob > r.logprob))
        columns["accuracy_norm"].append(float(c.logprob / c.n_tokens > r.logprob / r.n_tokens))
        if ref_scores is not None:
            rc, rr = ref_scores[2 * i], ref_scores[2 * i + 1]
            margin = (c.logprob - rc.logprob) - (r.logprob - rr.logprob)
            row["dpo_margin"] = margin
            columns["accuracy_dpo"].append(float(margin > 0))
        rows.append(row)
    metrics: dict[str, Any] = {"samples": len(usable), "skipped": len(triples) - len(usable)}
    for name, values in columns.items():
        if values:
            metrics[name], metrics[f"{name}_stderr"] = mean_and_stderr(values)
    return metrics, rows
