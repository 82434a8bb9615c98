"""Mid-training: the soup is the mean of its ingredients, an interruption in any ingredient resumes to the same
bytes, later stages start from the soup, and a model folder clearlm did not write is trained further and released."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_corpus, write_outside_llama, write_tiny_recipe
from safetensors.torch import load_file
from tokenizers import Tokenizer

from clearlm.errors import RecipeError
from clearlm.model.weights import load_model
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe, parse_recipe
from clearlm.release.compare import jsonl
from clearlm.release.verify import verify_release
from clearlm.stages import final_model, resolve, spec

MIDTRAIN = """
[midtrain]
seeds = [1, 2]
max_steps = 4
warmup_steps = 1
lr = 5e-3
checkpoint_interval = 2

[midtrain.data]
validation_fraction = 0.2
sources = [{ path = "mid/corpus.jsonl", license = "CC-BY-4.0" }]
"""


def _midtrain_recipe(folder: Path, head: str | None = None) -> Path:
    recipe = write_tiny_recipe(folder) if head is None else folder / "r.toml"
    (folder / "mid").mkdir()
    write_corpus(folder / "mid", n_docs=30, seed=5)
    recipe.write_text((recipe.read_text() if head is None else head) + MIDTRAIN)
    return recipe


def test_later_stages_start_from_the_soup_and_bad_settings_are_named(tmp_path):
    text = 'name = "x"\n[data]\nbuiltin = "cpython-stdlib"\n' + MIDTRAIN
    sft = '[sft]\nbuiltin = "stdlib-functions"\n'
    recipe = parse_recipe(text + sft, "r.toml", tmp_path).recipe
    plan = resolve(recipe, ["release"])
    assert plan == ["data", "tokenizer", "shards", "train", "mid_data", "mid_shards", "midtrain", "sft", "eval",
                    "release"]  # fmt: skip
    assert final_model(recipe) == "sft" and spec("sft").needs(recipe) == ("data", "midtrain")
    with pytest.raises(RecipeError, match=r"midtrain: warmup_steps \(4\) must be below max_steps \(4\)"):
        parse_recipe(text.replace("warmup_steps = 1", "warmup_steps = 4"), "r.toml", tmp_path)
    with pytest.raises(RecipeError, match=r"midtrain: seeds must differ"):
        parse_recipe(text.replace("seeds = [1, 2]", "seeds = [1, 1]"), "r.toml", tmp_path)


@pytest.mark.slow
def test_the_soup_is_the_mean_of_its_ingredients_and_any_interruption_resumes_bit_for_bit(tmp_path):
    recipe = load_recipe(_midtrain_recipe(tmp_path))
    straight = Pipeline(recipe, tmp_path / "straight").run("midtrain")
    folders = [straight.path / name for name in straight.metrics["ingredients"]]
    assert [f.name for f in folders] == ["seed-1", "seed-2"]
    ingredients = [load_file(f / "model.safetensors") for f in folders]
    soup = load_file(straight.path / "model.safetensors")
    for name, weight in soup.items():
        assert torch.equal(weight, (ingredients[0][name] + ingredients[1][name]) / 2), name
    assert not torch.equal(ingredients[0]["embed_tokens.weight"], ingredients[1]["embed_tokens.weight"])
    lrs = [r["lr"] for r in jsonl(straight.path / "log.jsonl") if r.get("seed") == 1 and "lr" in r]
    assert lrs[0] == pytest.approx(5e-3) and lrs[-1] == 0.0 and lrs == sorted(lrs, reverse=True)
    before, after = straight.metrics["bits_per_byte_before"], straight.metrics["bits_per_byte_after"]
    assert set(before) == set(after) == {"all", "code", "prose"}

    for stop in (3, 6):  # inside the first ingredient, and inside the second
        work = tmp_path / f"stopped-{stop}"
        assert Pipeline(recipe, work).run("midtrain", stop_after=stop) is None
        resumed = Pipeline(recipe, work).run("midtrain", resume=True)
        compared = 0
        for rel, digest in straight.manifest["outputs"].items():
            if rel.endswith(("state.json", "checksums.json")):  # the elapsed time, and the checksums of it
                continue
            if rel.endswith("log.jsonl"):  # compared without its wall-clock fields
                assert jsonl(resumed.path / rel) == jsonl(straight.path / rel), (stop, rel)
            else:
                assert resumed.manifest["outputs"].get(rel) == digest, (stop, rel)
            compared += 1
        assert compared > 10 and "ingredients/seed-2/model.safetensors" in straight.manifest["outputs"]


@pytest.mark.slow
def test_continued_pretraining_of_a_folder_clearlm_did_not_write(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_outside_llama(tmp_path / "outside")
    recipe = _midtrain_recipe(tmp_path, 'name = "continued"\n[eval]\nbatch_size = 4\n')
    recipe.write_text(recipe.read_text().replace("seeds = [1, 2]", f'base = "{folder}"\nseeds = [1, 2]'))
    pipe = Pipeline(load_recipe(recipe), tmp_path / "runs")
    assert pipe.stages() == ["mid_data", "mid_shards", "midtrain", "eval", "release"]
    release = pipe.run("release").path
    art = pipe.artifacts["midtrain"]
    assert art.metrics["optimizer"] == "fresh" and art.manifest["sources"]["base"]
    tok = Tokenizer.from_file(str(release / "tokenizer.json"))
    assert tok.token_to_id("</s>") == 0 and tok.token_to_id("<|endoftext|>") is not None
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    theirs = AutoModelForCausalLM.from_pretrained(release)(ids).logits
    assert torch.allclose(theirs, load_model(art.path)(ids), atol=1e-4)
    lineage = json.loads((release / "lineage.json").read_text())
    assert lineage["base_model"]["folder"] == str(folder) and "train" not in lineage
    assert sorted(p.name for p in (release / "midtraining" / "ingredients").iterdir()) == ["seed-1", "seed-2"]
    card = (release / "README.md").read_text()
    assert "## Mid-training" in card and f"the model folder `{folder}`" in card
    assert "Mid-training loss, per run" in (release / "report.html").read_text()
    assert (release / "data" / "midtrain_datasets" / "train.jsonl.zst").is_file()
    results = json.loads((release / "eval" / "results.json").read_text())
    assert set(results["mid_data_bits_per_byte"]) == {"all", "code", "prose"}
    verdict = verify_release(release, base_dir=tmp_path, workdir=tmp_path)
    assert verdict.reproduced, verdict.lines
