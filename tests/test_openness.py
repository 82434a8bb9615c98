"""MOF classes computed as the Model Openness Tool computes them, on hand-built MOT model files."""

from __future__ import annotations

import pytest
import yaml

from clearlm.openness.licenses import normalize
from clearlm.openness.mof import COMPONENTS, evaluate, from_mot, to_mot, validate_mot

ALL = [c.name for c in COMPONENTS]
CLASS_III = ["Model architecture", "Model parameters (Final)", "Model card", "Data card", "Technical report",
             "Evaluation results"]  # fmt: skip
CLASS_II = [*CLASS_III, "Training code", "Inference code", "Evaluation code", "Evaluation data"]
CLASS_I = [*CLASS_II, "Data preprocessing code", "Model parameters (Intermediate)", "Datasets", "Research paper"]


def _mot(names: list[str], distribution: str | None = "Apache-2.0", own: dict[str, str] | None = None) -> str:
    """A MOT model YAML listing `names`; `own` gives some components their own licence."""
    own = own or {}
    components = [{"name": n, "description": "x", **({"license": own[n]} if n in own else {})} for n in names]
    release = {"name": "m", "version": "1", "date": "2026-01-01", "type": "language", "architecture": "decoder",
               "origin": "", "producer": "t", "contact": "", "components": components}  # fmt: skip
    if distribution is not None:
        release["license"] = {"distribution": {"name": distribution, "path": ""}}
    return yaml.safe_dump({"framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
                           "release": release})  # fmt: skip


def _class(text: str):
    return evaluate(*from_mot(yaml.safe_load(text)))


@pytest.mark.parametrize(
    ("names", "expected", "progress"),
    [
        (ALL, 1, {3: 100.0, 2: 100.0, 1: 100.0}),
        (CLASS_I, 1, {3: 100.0, 2: 100.0, 1: 100.0}),
        (CLASS_II, 2, {3: 100.0, 2: 100.0, 1: 10 / 14 * 100}),
        (CLASS_III, 3, {3: 100.0, 2: 60.0, 1: 0.0}),
        (CLASS_III[:-1], 0, {3: 5 / 6 * 100, 2: 0.0, 1: 0.0}),
        ([n for n in CLASS_I if n != "Technical report"], 1, {3: 100.0, 2: 100.0, 1: 100.0}),  # the paper stands in
        ([n for n in CLASS_II if n != "Technical report"], 0, {3: 5 / 6 * 100, 2: 0.0, 1: 0.0}),
        ([n for n in CLASS_I if n != "Datasets"], 2, {3: 100.0, 2: 100.0, 1: 13 / 14 * 100}),
        ([n for n in CLASS_I if n not in ("Technical report", "Datasets", "Model parameters (Intermediate)",
                                          "Data preprocessing code")], 2, {3: 100.0, 2: 100.0, 1: 10 / 13 * 100}),
    ],
)  # fmt: skip
def test_class_and_progress_follow_mot(names, expected, progress):
    result = _class(_mot(names))
    assert result.mof_class == expected
    assert result.progress == pytest.approx(progress)


def test_a_missing_research_paper_holds_back_class_one():
    result = _class(_mot([n for n in CLASS_I if n != "Research paper"]))
    assert result.mof_class == 2
    assert result.reasons == ["Class I: Research paper is missing"]


def test_a_restrictive_licence_on_one_component_names_it():
    result = _class(_mot(CLASS_I, own={"Model parameters (Final)": "LicenseRef-llama-3.1"}))
    assert result.mof_class == 0 and result.status["Model parameters (Final)"] == "invalid"
    assert any("Model parameters (Final) has licence 'LicenseRef-llama-3.1'" in r for r in result.reasons)
    noncommercial = _class(_mot(CLASS_I, own={"Datasets": "CC-BY-NC-4.0"}))
    assert noncommercial.mof_class == 2 and noncommercial.status["Datasets"] == "invalid"


def test_an_open_licence_of_the_wrong_type_counts_with_a_warning():
    result = _class(_mot(CLASS_I, own={"Datasets": "MIT", "Model card": "CC-BY-4.0"}))
    assert result.mof_class == 1
    assert "Datasets" in result.wrong_type and "Model parameters (Final)" in result.wrong_type  # Apache-2.0 on data
    assert "Model card" not in result.wrong_type


def test_licences_resolve_as_mot_does():
    assert _class(_mot(CLASS_I, distribution=None)).mof_class == 0, "no licence anywhere"
    unlicensed = _class(_mot(CLASS_I, own={"Training code": "unlicensed"}))
    assert unlicensed.status["Training code"] == "unlicensed" and unlicensed.mof_class == 3
    assert _class(_mot(CLASS_I, own={"Training code": ""})).status["Training code"] == "unlicensed"
    assert _class(_mot(CLASS_I, distribution="apache-2.0")).mof_class == 0, "MOT matches licence ids exactly"
    typed = yaml.safe_load(_mot(CLASS_I, distribution="CC-BY-4.0"))
    typed["release"]["license"]["code"] = {"name": "PSF-2.0", "path": ""}  # not OSI-approved (Python-2.0 is)
    result = evaluate(*from_mot(typed))
    assert result.status["Training code"] == "invalid" and result.status["Datasets"] == "included"


def test_export_round_trips_in_mof_order():
    components = {n: {"license": "CC-BY-4.0"} if n == "Model card" else {} for n in reversed(CLASS_I)}
    doc = to_mot({"name": "m", "version": "1", "date": "2026-11-26", "type": "language"}, components,
                 {"distribution": "Apache-2.0"})  # fmt: skip
    assert validate_mot(yaml.safe_load(yaml.safe_dump(doc))) == []
    broken = {**doc, "release": {**doc["release"], "components": [{"name": "Weights", "description": ""}]}}
    assert validate_mot(broken) and "release.components.0.name" in validate_mot(broken)[0]
    assert [c["name"] for c in doc["release"]["components"]] == [n for n in ALL if n in CLASS_I]
    assert evaluate(*from_mot(yaml.safe_load(yaml.safe_dump(doc)))).mof_class == 1


def test_licence_names_normalise_to_spdx_and_are_classified():
    assert normalize("apache-2.0").spdx == "Apache-2.0" and normalize("Apache 2.0").kind == "osi-approved"
    assert normalize("cdla-permissive-2.0").kind == "open-data"
    assert normalize("llama3.1").kind == "restrictive" and normalize("openrail").kind == "restrictive"
    assert normalize("CC-BY-NC-4.0").kind == "restrictive"
    assert normalize(None).kind == "none" and normalize("my own terms").kind == "unknown"
