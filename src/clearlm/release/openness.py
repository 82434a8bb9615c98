"""A release's openness: where each MOF component is in the folder, under which licence, the class
that MOT's rules give it, and the OSI Open Source AI Definition (1.0) checklist.

Written as `openness.json`, as a MOT model file (`mot.yml`) and as a section of the model card.
Documents that clearlm generated from the run's records (model card, data card, technical report,
and the report standing in for a research paper) are marked as generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clearlm.openness.licenses import fits
from clearlm.openness.mof import COMPONENTS, evaluate, to_mot
from clearlm.openness.osaid import osaid_checklist
from clearlm.recipe import Recipe
from clearlm.stages import table

GENERATED = {"Model card", "Data card", "Technical report", "Research paper"}
# What a model post-trained from an outside folder cannot show: how its base was pretrained.
PRETRAINING = {"Datasets", "Training code", "Data preprocessing code", "Model parameters (Intermediate)"}


def _one(licences: set[str]) -> str:
    """One licence id, or an AND expression (which MOT, matching single ids, treats as not open)."""
    return " AND ".join(sorted(licences)) if licences else "NOASSERTION"


def release_components(
    recipe: Recipe,
    folder: Path,
    dataset_licences: set[str],
    eval_licences: set[str],
    will_write: frozenset[str] = frozenset(),
    pretrained_here: bool = True,
) -> dict[str, dict[str, Any]]:
    """MOF component -> {paths, license, generated, note} for the files present in `folder` (or about to be).

    A model post-trained from an outside base (`pretrained_here` false) lacks the pretraining components
    however open its post-training is: the base's data, code and checkpoints are not in the folder."""
    rel = recipe.release
    code, weights, docs = rel.code_license, rel.weights_license, rel.docs_license
    paper = (
        ("report.html", "generated technical report standing in for a research paper")
        if not rel.paper
        else (rel.paper, "research paper given by the recipe")
    )
    layout: dict[str, tuple[list[str], str, str]] = {
        "Model architecture": (["code/clearlm/model/", "config.json"], code, ""),
        "Data preprocessing code": (["code/clearlm/data/"], code, ""),
        "Training code": (["code/clearlm/train/"], code, ""),
        "Inference code": (["code/clearlm/model/generate.py", "code/clearlm/model/transformer.py"], code, ""),
        "Evaluation code": (["code/clearlm/eval/"], code, ""),
        "Supporting libraries and tools": (["code/requirements.txt", "code/clearlm/cli.py"], code, ""),
        "Model parameters (Final)": (["model.safetensors"], weights, ""),
        "Model parameters (Intermediate)": (["checkpoints/"], weights, ""),
        "Datasets": (
            [f"{s.datasets}/" for s in table() if s.datasets] + ["data/post_training/"],
            _one(dataset_licences),
            "the cleaned training and validation documents, and the post-training data",
        ),
        "Evaluation data": (["data/datasets/validation.jsonl.zst", "eval/samples.jsonl"], _one(eval_licences), ""),
        "Model metadata": (["config.json", "generation_config.json", "recipe.toml", "lineage.json"], weights, ""),
        "Sample model outputs": (["eval/generations.jsonl"], docs, ""),
        "Model card": (["README.md"], docs, ""),
        "Data card": (["data/data_card.md", "data/data_card.json"], docs, ""),
        "Technical report": (["report.html"], docs, ""),
        "Research paper": ([paper[0]], docs, paper[1]),
        "Evaluation results": (["eval/results.json"], docs, ""),
    }
    components = {}
    for name, (paths, licence, note) in layout.items():
        if not pretrained_here and name in PRETRAINING:
            continue
        found = [p for p in paths if "://" in p or p in will_write or (folder / p).exists()]
        if not found:
            continue
        components[name] = {
            "license": licence,
            "component_path": found[0],
            "paths": found,
            "generated": name in GENERATED and not (name == "Research paper" and rel.paper),
            "note": note,
        }
    return components


def openness_report(recipe: Recipe, components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    evaluation = evaluate({n: {"license": c["license"]} for n, c in components.items()})
    rows = []
    for comp in COMPONENTS:
        entry = components.get(comp.name)
        rows.append(
            {
                "component": comp.name,
                "mof_class": comp.mof_class,
                "required": comp.required,
                "present": bool(entry),
                "paths": entry["paths"] if entry else [],
                "license": entry["license"] if entry else None,
                "status": evaluation.status[comp.name],
                "right_type": bool(entry) and fits(entry["license"], comp.content),
                "generated": bool(entry and entry["generated"]),
                "note": entry["note"] if entry else "",
            }
        )
    framework = "Model Openness Framework 1.0 (classes as computed by LF AI's Model Openness Tool)"
    osaid = osaid_checklist(components)
    return {"mof": evaluation.as_dict(), "components": rows, "osaid": osaid, "framework": framework}


def mot_yaml(recipe: Recipe, components: dict[str, dict[str, Any]], date: str) -> str:
    rel = recipe.release
    release = {
        "name": rel.name or recipe.name,
        "version": "1",
        "date": date,
        "type": "language",
        "architecture": "transformer decoder",
        "origin": recipe.name,
        "producer": ", ".join(rel.authors) or "clearlm",
        "contact": "",
    }
    entries = {n: {k: c[k] for k in ("license", "component_path")} for n, c in components.items()}
    return yaml.safe_dump(to_mot(release, entries, {}), sort_keys=False, allow_unicode=True)


def card_section(report: dict[str, Any]) -> str:
    """The model card's openness section: class, reasons, one row per component."""
    mof = report["mof"]
    lines = [
        "## Openness",
        "",
        f"**{mof['label']}** under the Model Openness Framework (computed with the Model "
        "Openness Tool's rules; `openness.json`, `mot.yml`).",
        "",
    ]
    lines += [f"- Holds it back: {r}" for r in mof["reasons"]]
    osaid = report["osaid"]
    lines += [
        "",
        f"OSI Open Source AI Definition 1.0 checklist: {'complete' if osaid['complete'] else 'incomplete'} ("
        + ", ".join(f"{k}: {'yes' if v['met'] else 'no'}" for k, v in osaid["items"].items())
        + ").",
        "",
    ]
    lines += ["| component | class | where | licence | open | right type | generated |", "|---" * 7 + "|"]
    for row in report["components"]:
        where = ", ".join(f"`{p}`" for p in row["paths"]) or "missing"
        lines.append(
            f"| {row['component']} | {'I' * row['mof_class']} | {where} | {row['license'] or '-'} | "
            f"{'yes' if row['status'] == 'included' else 'no'} | {'yes' if row['right_type'] else 'no'} | "
            f"{'yes' if row['generated'] else ''} |"
        )
    generated = [r["component"] for r in report["components"] if r["generated"]]
    lines += ["", f"Generated by clearlm from the run's records: {', '.join(generated)}.", ""]
    return "\n".join(lines)
