"""Task metrics as lm-evaluation-harness defines them, with the standard error of each mean."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

import numpy as np

from clearlm.eval.taskspec import ExactMatch


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


def exact_match(prediction: str, reference: str, options: ExactMatch) -> float:
    """lm-eval's exact_match for one item: each regex removed from both, then case, punctuation and digits."""
    for pattern in options.regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if options.ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for ignored, asked in ((string.punctuation, options.ignore_punctuation), (string.digits, options.ignore_numbers)):
        if asked:
            table = str.maketrans("", "", ignored)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of the HumanEval paper, 1 - C(n-c, k) / C(n, k), computed as its product form (as HF
    evaluate's code_eval computes it) for numerical stability. Needs n >= k samples."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


def true_mass(logprobs: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2 (lm-eval's truthfulqa_mc2 `acc`): the share of probability on the true answers."""
    lls = np.array(logprobs)
    probs = np.exp(lls - lls.max())  # lm-eval exponentiates as is: the same share, without 0/0 at very low values
    return float(np.sum((probs / np.sum(probs))[np.array(labels) == 1]))
