"""The stage table: a stage declared in this test alone runs, is found again, is verified and is released, and
`run --plan` says what it would do and why, all with no other edit."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clearlm import stages
from clearlm.cli import app
from clearlm.data.documents import read_jsonl
from clearlm.errors import RecipeError
from clearlm.pipeline import Pipeline, Reporter
from clearlm.recipe import load_recipe, parse_recipe
from clearlm.release.verify import verify_release
from clearlm.stages import StageRun, StageSpec, resolve


def build_word_counts(run: StageRun, out: Path) -> dict[str, Any]:
    """The toy stage: the ten most common words of the training split, per source."""
    counts: dict[str, Counter[str]] = {}
    for doc in read_jsonl(run.inputs["data"].path / "train.jsonl"):
        counts.setdefault(doc["source"], Counter()).update(doc["text"].split())
    top = {source: dict(c.most_common(10)) for source, c in sorted(counts.items())}
    (out / "counts.json").write_text(json.dumps(top, indent=2) + "\n")
    return {"sources": len(top)}


TOY = StageSpec("word_counts", "Word counts", f"{__name__}:build_word_counts", needs=lambda recipe: ("data",),
                config=lambda loaded: {"top": 10}, asked=lambda recipe: True, torch=False,
                release={"counts.json": "analysis/word_counts.json"})  # fmt: skip


@pytest.fixture
def with_toy(monkeypatch: pytest.MonkeyPatch) -> None:
    table = list(stages.STAGES.items())
    monkeypatch.setattr(stages, "STAGES", dict([*table[:1], ("word_counts", TOY), *table[1:]]))


class Events(Reporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def stage_started(self, kind: str) -> None:
        self.events.append(("built", kind))

    def stage_skipped(self, kind: str, artifact: Any) -> None:
        self.events.append(("found", kind))


@pytest.mark.slow
def test_a_stage_declared_in_a_test_runs_is_cached_verified_and_released(with_toy, tmp_path, tiny_recipe):
    loaded = load_recipe(tiny_recipe)
    first = Events()
    release = Pipeline(loaded, tmp_path / "runs", first).run("release").path
    assert ("built", "word_counts") in first.events
    lineage = json.loads((release / "lineage.json").read_text())
    assert lineage["word_counts"]["inputs"]["data"]["digest"] == lineage["data"]["digest"]
    released = json.loads((release / "analysis" / "word_counts.json").read_text())
    assert set(released) == {"code", "prose"} and all(len(top) == 10 for top in released.values())
    assert "word_counts" in (release / "report.html").read_text()  # its digest, in the reproduction table

    again = Events()
    Pipeline(loaded, tmp_path / "runs", again).run("release")
    assert again.events and all(event == "found" for event, _ in again.events), again.events
    assert ("found", "word_counts") in again.events

    plan = {entry.stage: entry for entry in Pipeline(loaded, tmp_path / "runs").plan()}
    assert list(plan)[:2] == ["data", "word_counts"] and plan["word_counts"].action == "cached"

    verdict = verify_release(release, base_dir=tiny_recipe.parent, workdir=tmp_path)
    assert verdict.reproduced and any(line.startswith("word_counts: reproduced bit-for-bit") for line in verdict.lines)
    (release / "analysis" / "word_counts.json").write_text("{}\n")
    tampered = verify_release(release, base_dir=tiny_recipe.parent, workdir=tmp_path)
    assert not tampered.reproduced and tampered.files == ["analysis/word_counts.json"]


def test_plan_names_the_setting_that_changed_and_runs_nothing(tmp_path, tiny_recipe):
    runner = CliRunner()
    done = runner.invoke(app, ["data", str(tiny_recipe), "--workdir", str(tmp_path / "runs")])
    assert done.exit_code == 0, done.output
    built = sorted(p.name for p in (tmp_path / "runs" / "artifacts").iterdir() if p.name != ".locks")
    plan = runner.invoke(app, ["run", str(tiny_recipe), "--plan", "--workdir", str(tmp_path / "runs"),
                               "--set", "tokenizer.vocab_size=300"], env={"COLUMNS": "250"})  # fmt: skip
    assert plan.exit_code == 0, plan.output
    rows = {line.split("│")[1].strip(): line for line in plan.output.splitlines() if line.count("│") > 3}
    assert "cached" in rows["data"] and "build" in rows["tokenizer"], plan.output
    assert "setting changed: tokenizer.vocab_size" in rows["tokenizer"], plan.output
    assert "input changed: tokenizer" in rows["shards"], plan.output
    assert "not built yet" in rows["train"], plan.output
    after = sorted(p.name for p in (tmp_path / "runs" / "artifacts").iterdir() if p.name != ".locks")
    assert after == built  # nothing ran


def test_a_recipe_needs_only_the_sections_its_stages_use(tmp_path):
    folder = '[sft]\nbase = "some/model"\ndata = [{ path = "chat.jsonl" }]\n'
    recipe = parse_recipe('name = "x"\n' + folder, "r.toml", tmp_path).recipe
    assert resolve(recipe, ["release"]) == ["sft", "eval", "release"]
    with pytest.raises(RecipeError, match=r"^r\.toml: the recipe has no \[data\] section \(needed by sft\)"):
        parse_recipe('name = "x"\n' + folder + 'builtin = "stdlib-functions"\n', "r.toml", tmp_path)
