"""The tables the command line, the model card, the data card and the technical report share."""

from __future__ import annotations

from typing import Any

NOT_METRICS = {"samples", "skipped", "num_fewshot"}  # a task's counts and settings beside its metrics


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def metric_rows(tasks: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """[task, metric, value, stderr, items] for every metric of every task (standard errors beside their metric)."""
    rows = []
    for task, metrics in tasks.items():
        for name, value in metrics.items():
            if name in NOT_METRICS or name.endswith("_stderr"):
                continue
            err = metrics.get(f"{name}_stderr")
            stderr = f"{err:.4f}" if err is not None else ""
            rows.append([task, name, f"{value:.4f}", stderr, metrics.get("samples", "")])
    return rows
