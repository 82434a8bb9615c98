"""Document-length histograms for the data card (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
from pathlib import Path

from clearlm.data.documents import read_jsonl


def length_histogram(jsonl_files: list[Path], out: Path) -> dict[str, list[int]]:
    """Histogram of document lengths in bytes (log-spaced bins) per source; saves a PNG, returns counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = [2**k for k in range(4, 25)]  # 16 B .. 16 MiB
    counts: dict[str, list[int]] = {}
    for path in jsonl_files:
        for doc in read_jsonl(path):
            size = len(doc["text"].encode("utf-8"))
            row = counts.setdefault(doc["source"], [0] * (len(edges) + 1))
            row[min(max(0, math.ceil(math.log2(max(size, 1))) - 4), len(edges))] += 1
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for source, row in sorted(counts.items()):
        ax.step(range(len(row)), row, where="mid", label=source)
    ax.set_xticks(range(0, len(edges) + 1, 2), [f"{2 ** (k + 4) // 1024}K" if k >= 6 else str(2 ** (k + 4))
                                                  for k in range(0, len(edges) + 1, 2)])  # fmt: skip
    ax.set_xlabel("document length (bytes, up to)")
    ax.set_ylabel("documents")
    ax.set_title("Kept documents by length")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return counts
