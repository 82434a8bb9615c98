"""The data card: where every document came from, under which licence, and what cleaning removed."""

from __future__ import annotations

from typing import Any

from clearlm.tables import markdown_table


def data_card(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    splits, before = metrics["splits"], metrics.get("before_steps", {})
    lines = ["# Data card", "", "## Sources", ""]
    rows = []
    for source, licence in metrics["licenses"].items():
        read = before.get(source, {})
        train = splits["train"].get(source, {}).get("documents", 0)
        validation = splits["validation"].get(source, {}).get("documents", 0)
        rows.append([source, licence, read.get("documents", ""), read.get("bytes", ""), train, validation])
    header = ["source", "licence", "documents read", "bytes read", "train documents", "validation documents"]
    lines.append(markdown_table(header, rows))
    lines += ["", "## Cleaning steps", ""]
    steps = metrics.get("steps", {})
    if not steps:
        lines.append("No cleaning steps: every document read was kept.")
    else:
        rows = []
        for name, s in steps.items():
            label = "{} masked" if name == "pii" else "{}"
            found = {**s["reasons"], **{label.format(k): v for k, v in s.get("counts", {}).items()}}
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(found.items(), key=lambda kv: -kv[1]))
            rows.append([name, s["documents_in"], s["removed"], s["bytes_in"], s["bytes_out"], reasons or "-"])
        lines.append(markdown_table(["step", "documents in", "removed", "bytes in", "bytes out", "reasons"], rows))
        sample = config.get("removed_sample", 1.0)
        listed = "Every removed document is" if sample == 1 else f"A {sample:.0%} sample of removed documents is"
        lines += ["", f"{listed} listed with its step and reason in `removed.jsonl` (duplicates name the "
                  "document kept in their place)."]  # fmt: skip
    if metrics.get("rejects") or metrics.get("skipped_files"):
        lines += ["", "## Rejected input", ""]
        lines += [f"- {reason}: {n} records (listed in `rejects.jsonl` with file and line)"
                  for reason, n in metrics.get("rejects", {}).items()]  # fmt: skip
        lines += [f"- skipped file: {f}" for f in metrics.get("skipped_files", [])]
    mixing = metrics.get("mixing", {})
    if any(m["weight"] != 1.0 for m in mixing.values()):
        rows = [[src, m["weight"], m["documents_in"], m["documents_out"]] for src, m in mixing.items()]
        header = ["source", "weight", "documents kept", "documents in the mix"]
        lines += ["", "## Mix", "", markdown_table(header, rows)]
    lines += ["", "## Lengths", "", "![Kept documents by length](lengths.png)"]
    lines += [
        "",
        "## Split",
        "",
        f"Validation fraction {config.get('validation_fraction')}, by a sha256 of each document's split key "
        "(module name for the built-in corpus, document id otherwise)"
        + "".join(
            f"; the last {s['tail_validation']:g} of each text file of `{s['path']}` (from a line start) is "
            "validation, the rest training"
            for s in config.get("sources", [])
            if s.get("tail_validation")
        )
        + ": "
        f"{metrics['documents']['train']} training and {metrics['documents']['validation']} validation documents, "
        f"{metrics['bytes']['train']:,} and {metrics['bytes']['validation']:,} bytes.",
        "",
    ]
    return "\n".join(lines)


def tokens_section(shards: dict[str, Any]) -> str:
    """Tokens per source and split (known once the tokenizer exists), appended to the release's card."""
    rows = [[source, split, n["documents"], f"{n['tokens']:,}"]
            for split in ("train", "validation") for source, n in shards[split].get("sources", {}).items()]  # fmt: skip
    table = markdown_table(["source", "split", "documents", "tokens (end-of-text included)"], rows)
    return "\n".join(["", "## Tokens", "", table, ""])


_BUILTIN = {
    "stdlib-functions": "built from the training split's standard-library modules: each documented public "
    "top-level function becomes a request (its signature and the first line of its docstring) answered by its "
    "source; for preference pairs the rejected answer is another function, the function cut after half its "
    "lines, or its body shuffled (chosen by a hash of module and name); for RL the request alone, with the "
    "function's name as the `entry_point` the `python_function` verifier looks for",
}


def post_training_section(stages: dict[str, dict[str, Any]]) -> str:
    """The data behind SFT and DPO: sources and licences, counts, what was dropped, how built-in sets are made."""
    if not stages:
        return ""
    rows = [[stage, source, licence] for stage, m in stages.items() for source, licence in m["licenses"].items()]
    lines = ["", "## Post-training data", "", markdown_table(["stage", "source", "licence"], rows), ""]
    for stage, m in stages.items():
        used = next(f"{m[k]} {k}" for k in ("examples", "pairs", "prompts") if k in m)
        lines.append(f"- {stage}: {used} trained on; counts {m['counts']}; "
                     f"bad rows {m['bad_rows'] or 'none'} (listed in the stage's `rejects.jsonl`).")  # fmt: skip
    for name in sorted({n for m in stages.values() for n in m["licenses"] if n in _BUILTIN}):
        lines.append(f"- `{name}`: {_BUILTIN[name]}.")
    return "\n".join([*lines, ""])
