"""The model card: Hugging Face YAML front matter plus a human-readable account of the whole run."""

from __future__ import annotations

import json
import math
from typing import Any

from clearlm.stages import describe, spec
from clearlm.tables import NOT_METRICS, markdown_table, metric_rows

# Licence ids the Hugging Face Hub accepts in model card metadata (lower-cased SPDX ids).
_HF_LICENSES = {
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
    "cdla-permissive-2.0", "odc-by", "odbl", "pddl", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0",
    "unlicense", "openrail", "cc-by-nc-4.0", "llama3", "gemma",
}  # fmt: skip


def hf_license(spdx: str) -> dict[str, str]:
    lowered = spdx.lower()
    if lowered in _HF_LICENSES:
        return {"license": lowered}
    return {"license": "other", "license_name": spdx}


def _front_matter(meta: dict[str, Any]) -> str:
    """YAML front matter; every value is written as JSON, which YAML reads unchanged."""
    lines = [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in meta.items()]
    return "---\n" + "\n".join(lines) + "\n---\n"


def _headline(metrics: dict[str, Any]) -> list[str]:
    """A task's metric for the card's model-index: accuracy where there is one, else its first finite metric."""
    names = [k for k, v in metrics.items() if k not in NOT_METRICS and "_stderr" not in k
             and isinstance(v, (int, float)) and math.isfinite(v)]  # fmt: skip
    return ["acc"] if "acc" in names else names[:1]


def _task_lines(tasks: dict[str, dict[str, Any]]) -> list[str]:
    if not tasks:
        return []
    header = "Tasks (scored as lm-evaluation-harness scores them):"
    return [header, "", markdown_table(["task", "metric", "value", "stderr", "items"], metric_rows(tasks)), ""]


def _post_training_lines(recipe: dict[str, Any], stages: dict[str, dict[str, Any]]) -> list[str]:
    """Base model, data, hyperparameters and results of SFT and DPO, when the recipe has them."""
    stages = {name: m for name, m in stages.items() if not spec(name).card}  # the others describe themselves
    if not stages:
        return []
    lines = ["## Post-training", ""]
    for stage, m in stages.items():
        cfg = recipe[stage]
        data = ", ".join(f"{name} ({lic})" for name, lic in m["licenses"].items())
        hyper = ", ".join(f"{k} {cfg[k]}" for k in ("epochs", "lr", "warmup_ratio", "micro_batch_size",
                                                      "grad_accum_steps", "loss", "beta") if k in cfg)  # fmt: skip
        what = spec(stage).label
        losses = f"{m['first_loss']:.4f} -> {m['final_loss']:.4f}"
        lines.append(f"{what} of `{cfg['base']}` on {data}: {hyper}. {m['steps']} steps; mean loss over the first "
                     f"and last tenth of them {losses}; counts {m['counts']}, bad rows {m['bad_rows'] or 'none'}. "
                     f"Per-step log: `post_training/{stage}_log.jsonl`.")  # fmt: skip
        if m.get("held_out_before"):
            before, after = m["held_out_before"], m["held_out_after"]
            lines.append(f"Preference accuracy on {before['pairs']} held-out pairs (chosen answer more likely): "
                         f"{before['acc']:.3f} before DPO, {after['acc']:.3f} after (per token: "
                         f"{before['acc_norm']:.3f} -> {after['acc_norm']:.3f}).")  # fmt: skip
        lines.append("")
    lines += ["The chat template (Tulu 3 style) is in `tokenizer_config.json`: "
              "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.", ""]  # fmt: skip
    return lines


_ARCHITECTURES = {"llama": "Llama-family", "olmo2": "OLMo 2"}


def optimizer_summary(t: dict[str, Any]) -> str:
    return f"Muon (hidden matrices, lr {t['muon_lr']}) with AdamW" if t.get("optimizer") == "muon" else "AdamW"


def schedule_summary(t: dict[str, Any]) -> str:
    if t.get("schedule") == "wsd":
        return f"warmup-stable-decay (last {t['decay_fraction']:g} of the steps decaying)"
    return "cosine"


def _training_lines(t: dict[str, Any], train: dict[str, Any]) -> list[str]:
    return [
        "## Training",
        "",
        f"{train['steps']} steps of {optimizer_summary(t)} (lr {t['lr']}, warmup {t['warmup_steps']}, "
        f"{schedule_summary(t)} to {t['min_lr_ratio']} x lr, weight decay {t['weight_decay']}), "
        f"{train['tokens']:,} tokens in {train['train_seconds']:.0f} s "
        f"({train['tokens_per_s'] or 0:,.0f} tokens/s). Final training loss {train['final_loss']:.4f}; "
        f"validation loss {train['initial_val_loss']:.4f} at initialisation, {train['val_loss']:.4f} at the end. "
        "The per-step log is in `training/log.jsonl`; intermediate weights are in `checkpoints/`.",
        "",
    ]


def _base_model_lines(base: dict[str, Any]) -> list[str]:
    licences = ", ".join(base["licences"]) or "none found"
    return [
        "## Base model",
        "",
        f"Post-trained from the model folder `{base['folder']}` ({base['digest']}), which clearlm did not "
        f"train: its licences as declared there: {licences}; its openness as `clearlm audit` finds it: "
        f"{base['mof_class']}; unsafe findings: {base['unsafe_findings']}. Its pretraining data, code and "
        "checkpoints are not part of this release, so the openness report below counts those components "
        "as missing; the base's own terms apply to what it contributes.",
        "",
    ]


def model_card(ctx: dict[str, Any]) -> str:
    """Render the card from the release context (recipe, stage metrics, digests)."""
    recipe, data, train, evaluation = ctx["recipe"], ctx["data"], ctx["train"], ctx["eval"]
    rel = recipe["release"]
    bpb = evaluation.get("bits_per_byte", {})
    meta: dict[str, Any] = {
        **hf_license(rel["weights_license"]),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["clearlm", ctx["model"]["architecture"], *(["fully-open"] if train else [])],
        **({"base_model": ctx["base_model"]["folder"]} if ctx["base_model"] else {}),
        "datasets": sorted(data["licenses"]) if data else [],
        "metrics": ["bits_per_byte"],
        "model-index": [
            {
                "name": ctx["name"],
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Language modelling"},
                        "dataset": {"name": f"{domain} (validation)", "type": domain},
                        "metrics": [{"type": "bits_per_byte", "value": round(m["bits_per_byte"], 4)}],
                    }
                    for domain, m in bpb.items()
                ]
                + [
                    {
                        "task": {"type": "multiple-choice" if "acc" in m else "text-generation", "name": task},
                        "dataset": {"name": task, "type": task},
                        "metrics": [{"type": name, "value": round(m[name], 4)} for name in _headline(m)],
                    }
                    for task, m in evaluation.get("tasks", {}).items()
                    if _headline(m)
                ],
            }
        ],
    }
    data_lines = []
    if data:
        splits = data["splits"]
        rows = [[src, data["licenses"].get(src, "?"), v["documents"], v["bytes"],
                 splits["validation"].get(src, {}).get("bytes", 0)] for src, v in splits["train"].items()]  # fmt: skip
        data_lines = ["## Training data" if train else "## Corpus (evaluation and built-in post-training sets)", "",
                      markdown_table(["source", "licence", "train documents", "train bytes", "validation bytes"], rows),
                      ""]  # fmt: skip
    untrained = evaluation.get("untrained_bits_per_byte", {})
    eval_rows = [
        [
            d,
            f"{m['bits_per_byte']:.4f}",
            f"{untrained[d]['bits_per_byte']:.4f}" if d in untrained else "",
            m["documents"],
            m["bytes"],
        ]
        for d, m in bpb.items()
    ]
    m = ctx["model"]
    lines = [
        _front_matter(meta),
        f"# {ctx['name']}",
        "",
        rel["description"]
        or (
            "A small language model trained end to end with clearlm; every part of it is open."
            if train
            else "A chat model post-trained with clearlm from a base model that clearlm did not train."
        ),
        "",
        f"Authors: {', '.join(rel['authors']) or 'not given'}. Weights: {rel['weights_license']}; "
        f"documents: {rel['docs_license']}; code: {rel['code_license']}. Built with clearlm {ctx['clearlm_version']}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        *data_lines,
        "## Model",
        "",
        f"{_ARCHITECTURES[m['architecture']]} decoder: {ctx['parameters']:,} parameters, d_model {m['d_model']}, "
        f"{m['n_layers']} layers, {m['n_heads']} heads, context {m['context']}, vocabulary {ctx['vocab_size']}, "
        f"tied embeddings: {m['tie_embeddings']}.",
        "",
        *(_training_lines(recipe["train"], train) if train else _base_model_lines(ctx["base_model"])),
        *(line for name, metrics in ctx["stages"].items() for line in describe(name, "card", recipe, metrics)),
        *_post_training_lines(recipe, ctx.get("post_training", {})),
        "## Evaluation",
        "",
        "Bits per byte on the held-out validation split, per domain (lower is better):",
        "",
        markdown_table(["domain", "bits/byte", "untrained model", "documents", "bytes"], eval_rows),
        "",
        *_task_lines(evaluation.get("tasks", {})),
        "Full results: `eval/results.json`; per-item log-likelihoods: `eval/samples.jsonl`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "pip install clearlm",
        "clearlm run recipe.toml",
        "```",
        "",
        "`manifest.json` and `lineage.json` list the digest, configuration and output hashes of every stage "
        "(data, tokenizer, shards, training, post-training, evaluation) that produced this folder.",
        "",
    ]
    return "\n".join(lines)
