"""Task metrics as lm-evaluation-harness defines them, with the standard error of each mean."""

from __future__ import annotations

import math
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy's rule, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def acc_norm_pred(logprobs: Sequence[float], choices: Sequence[str]) -> int:
    """lm-eval's acc_norm: log-likelihood divided by the choice's length in characters."""
    return argmax([lp / len(c) for lp, c in zip(logprobs, choices, strict=True)])


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def perplexity(logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per item (lm-eval's `perplexity` aggregation)."""
    return math.exp(-sum(logprobs) / len(logprobs))
