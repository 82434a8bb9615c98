"""The OSI Open Source AI Definition 1.0 as a checklist over MOF components.

OSAID asks for three things: data information (enough to build a substantially equivalent system:
the data card, the processing code, the data or how to obtain it), the complete code used to
process data, train and run the model under OSI-approved licences, and the parameters under
OSI-approved terms (open data licences are accepted here for weights, as OSI has approved none).
"""

from __future__ import annotations

from typing import Any

from clearlm.openness.licenses import OPEN_DATA, OSI_APPROVED


def osaid_checklist(components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The OSAID 1.0 checklist: data information, code, parameters, each with its evidence."""

    def has(name: str) -> bool:
        return name in components

    code = ["Data preprocessing code", "Training code", "Inference code", "Model architecture", "Evaluation code"]
    items = {
        "data information": (
            has("Data card") and has("Data preprocessing code") and has("Datasets"),
            "data card, the cleaning code and the cleaned datasets (or the recipe that rebuilds them)",
        ),
        "code": (
            all(has(n) and components[n]["license"] in OSI_APPROVED for n in code),
            "the complete code used to process data, train, run and evaluate, under OSI-approved licences",
        ),
        "parameters": (
            has("Model parameters (Final)")
            and components["Model parameters (Final)"]["license"] in OSI_APPROVED | OPEN_DATA,
            "the weights (final and intermediate) under OSI-approved or open data terms",
        ),
    }
    return {
        "complete": all(ok for ok, _ in items.values()),
        "items": {k: {"met": ok, "requires": why} for k, (ok, why) in items.items()},
    }
