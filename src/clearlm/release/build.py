"""Assemble the release folder from the artifacts of a run; what it copies of each stage is in the stage table.

Layout (transformers reads the top level and ignores the rest):
  config.json, model.safetensors, generation_config.json   the model, in transformers' Llama layout
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
  README.md          model card with Hugging Face metadata
  recipe.toml        the recipe exactly as run (overrides applied)
  training/log.jsonl the per-step training log
  checkpoints/       intermediate weights (safetensors)
  midtraining/       mid-training's per-step log and each ingredient's weights (when the recipe mid-trains)
  eval/results.json  evaluation results
  data/data_card.json  the data card's figures: sources, licences, steps, mix, tokens per source
  data/datasets/     the cleaned train and validation documents (jsonl.zst), unless the recipe says not
                     (and data/midtrain_datasets/: mid-training's mix)
  eval/generations.jsonl  sample generations (fixed prompts and seeds)
  code/              the exact clearlm source that built this folder, and the library versions
  report.html        the technical report (self-contained page with charts)
  openness.json, mot.yml  MOF components, licences and class; OSAID checklist; MOT model file
  lineage.json       every upstream artifact: digest, config, environment, output hashes
  manifest.json      written by the artifact store: this folder's digest and file hashes
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tomli_w
import zstandard

import clearlm
from clearlm import __version__
from clearlm.artifacts import Artifact, environment
from clearlm.data.card import post_training_section, tokens_section
from clearlm.data.chat import CHAT_TEMPLATE
from clearlm.data.documents import read_jsonl
from clearlm.data.tokenizer import load_tokenizer, own_tokenizer
from clearlm.errors import InputError
from clearlm.eval.taskspec import resolve_tasks
from clearlm.model.generate import Sampling, complete
from clearlm.model.hf import save_hf
from clearlm.model.weights import WEIGHTS, load_model
from clearlm.openness.audit import audit_folder
from clearlm.recipe import LoadedRecipe, Recipe
from clearlm.release.card import model_card
from clearlm.release.openness import card_section, mot_yaml, openness_report, release_components
from clearlm.release.report import technical_report
from clearlm.stages import StageRun, final_model, outside_base, post_training, resolve, spec
from clearlm.trace import memorization
from clearlm.trace.contamination import contamination
from clearlm.trace.index import training_sets
from clearlm.trace.query import open_index

_NOT_PACKAGES = {"python", "platform", "machine", "cpu_count"}
_GENERATED_FILES = frozenset({"README.md", "report.html"})


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _tokenizer_files(tokenizer_dir: Path, eos: str, pad: str, out: Path, context: int, chat: bool) -> None:
    """tokenizer.json and the configs transformers reads; the chat template only for post-trained models."""
    shutil.copy2(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    _dump(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos,
            "eos_token": eos,
            "pad_token": pad,
            "model_max_length": context,
            "clean_up_tokenization_spaces": False,
            **({"chat_template": CHAT_TEMPLATE} if chat else {}),
            "add_bos_token": False,
            "add_eos_token": False,
        },
    )
    _dump(out / "special_tokens_map.json", {"bos_token": eos, "eos_token": eos, "pad_token": pad})


def _base_model(base_dir: Path, folder: str, digest: str) -> dict[str, Any]:
    """What the release says of an outside base model: where it was, its digest, and its own audit."""
    audit = audit_folder(base_dir / folder)
    licences = sorted({entry["spdx"] or entry["raw"] for entry in audit["licences"]})
    return {"folder": folder, "digest": digest, "mof_class": audit["mof"]["label"], "licences": licences,
            "unsafe_findings": len(audit["unsafe"])}  # fmt: skip


def _code_snapshot(out: Path) -> None:
    """clearlm's own source (the files its code digest covers) and the versions of the libraries it ran on."""
    root = Path(clearlm.__file__).parent
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml") and p.is_file()):
        target = out / "clearlm" / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    env = environment()
    pins = [f"{pkg}=={env[pkg]}" for pkg in sorted(env) if pkg not in _NOT_PACKAGES and env[pkg]]
    (out / "requirements.txt").write_text(f"# clearlm {__version__} ran with Python {env['python']}\n"
                                          + "\n".join(pins) + "\n")  # fmt: skip


def _user_verifiers(loaded: LoadedRecipe, artifacts: dict[str, Artifact], out: Path) -> None:
    """The recipe's own RL verifier files (their code decided the rewards), under their recipe-relative names."""
    if "rlvr" not in artifacts:
        return
    for v in loaded.recipe.rlvr.verifiers:
        if v.function:
            file = v.function.rpartition(":")[0]
            target = out / file.replace("/", "__").replace("\\", "__")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(loaded.base_dir / file, target)


def _compress(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst, "wb") as g:
        zstandard.ZstdCompressor(level=10, threads=0).copy_stream(f, g)


_PROMPTS = ("def main():", "The", "Question:")  # for a release with no validation split to take prompts from


def _generations(model: Any, tok: Any, eos_id: int, validation: Path | None, n: int = 3) -> list[dict[str, Any]]:
    """Continuations of the first line of the first validation documents (fixed seeds: reproducible)."""
    prompts = []
    for doc in read_jsonl(validation) if validation is not None else ({"text": p} for p in _PROMPTS):
        first = doc["text"].strip().split("\n", 1)[0][:80]
        if first:
            prompts.append(first + "\n")
        if len(prompts) == n:
            break
    settings = {"max_new_tokens": min(60, model.cfg.context // 2), "temperature": 0.8, "top_k": 50}
    return [{"prompt": p, "completion": complete(model, tok, p, max_new_tokens=settings["max_new_tokens"],
                                                 sampling=Sampling(0.8, 50, seed=i), eos_id=eos_id),
             "seed": i, **settings} for i, p in enumerate(prompts)]  # fmt: skip


def _licences(recipe: Recipe, base_dir: Path, artifacts: dict[str, Artifact]) -> tuple[set[str], set[str]]:
    """(dataset licences, evaluation data licences): every stage's data's (corpus, post-training sets), and the
    tasks' plus the validation split's."""
    datasets = {v for art in artifacts.values() for v in art.metrics.get("licenses", {}).values()}
    specs = resolve_tasks(recipe.eval.tasks, [base_dir / f for f in recipe.eval.task_files])
    validation = set(artifacts["data"].metrics["licenses"].values()) if "data" in artifacts else set()
    return datasets, {s.license for s in specs} | (validation if recipe.eval.bpb else set())


def _write_model(recipe: Recipe, artifacts: dict[str, Artifact], out: Path) -> tuple[Any, Any, int]:
    """The final model in transformers' layout with its tokenizer (and the chat template, for a post-trained
    model); returns the model, its tokenizer and the end-of-text id."""
    tok_cfg = recipe.tokenizer
    final = artifacts[final_model(recipe)]
    tok_dir = final.path if own_tokenizer(final.path) else artifacts["tokenizer"].path
    tok = load_tokenizer(tok_dir)
    eos_id, pad_id = tok.token_to_id(tok_cfg.eos_token), tok.token_to_id(tok_cfg.pad_token)
    model = load_model(final.path)
    save_hf(model, out, bos_id=eos_id, eos_id=eos_id, pad_id=pad_id)
    _dump(out / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id})
    chat = bool(post_training(recipe, list(artifacts)))
    _tokenizer_files(tok_dir, tok_cfg.eos_token, tok_cfg.pad_token, out, model.cfg.context, chat)
    return model, tok, eos_id


def _write_recipe(loaded: LoadedRecipe, out: Path) -> None:
    (out / "recipe.toml").write_text(
        f"# Recipe as run by clearlm {__version__}; the original text follows at the end.\n"
        + tomli_w.dumps(loaded.recipe.model_dump(mode="json", exclude_none=True))
        + "\n# Original recipe:\n"
        + "".join(f"# {line}\n" for line in loaded.text.splitlines())
    )


def _copy_stage_files(artifacts: dict[str, Artifact], out: Path) -> None:
    """What the stage table says the release keeps of each stage: logs, results, intermediate weights."""
    for name, art in artifacts.items():
        stage = spec(name)
        for pattern, target in stage.release.items():
            for found in sorted(art.path.glob(pattern)):  # a glob's files keep their paths under the target folder
                dest = out / target / found.relative_to(art.path) if "*" in pattern else out / target
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(found, dest)
        if stage.checkpoints:
            for ckpt in sorted(p for p in (art.path / "checkpoints").glob("step-*") if (p / WEIGHTS).is_file()):
                (out / stage.checkpoints / ckpt.name).mkdir(parents=True)
                shutil.copy2(ckpt / WEIGHTS, out / stage.checkpoints / ckpt.name / WEIGHTS)


def _write_data(loaded: LoadedRecipe, artifacts: dict[str, Artifact], out: Path) -> None:
    """The data card (each corpus, tokens per source, post-training data) and, unless the recipe says not, the
    cleaned datasets and the post-training files."""
    recipe = loaded.recipe
    corpora = [name for name in artifacts if spec(name).datasets]
    post = {name: artifacts[name].metrics for name in post_training(recipe, list(artifacts))}
    cards = []
    for name in corpora:
        data = artifacts[name]
        card = (data.path / "data_card.md").read_text()
        cards.append(card if name == "data" else card.replace("# Data card", f"# {spec(name).label}", 1))
        if name == "data":
            tokens = {}
            if "shards" in artifacts:
                shards = artifacts["shards"].metrics
                tokens = {split: shards[split].get("sources", {}) for split in ("train", "validation")}
                cards[-1] += tokens_section(shards)
            _dump(out / "data" / "data_card.json", {**data.metrics, "tokens": tokens})
            shutil.copy2(data.path / "lengths.png", out / "data" / "lengths.png")
    if cards or post:
        (out / "data").mkdir(exist_ok=True)
        (out / "data" / "data_card.md").write_text("\n".join(cards) + post_training_section(post))
    if not recipe.release.include_datasets:
        return
    for name in corpora:
        for split in ("train", "validation"):
            _compress(artifacts[name].path / f"{split}.jsonl", out / spec(name).datasets / f"{split}.jsonl.zst")
    for stage in post:
        for item in getattr(recipe, stage).data:
            name = item.path.replace("/", "__").replace("\\", "__")
            _compress(loaded.base_dir / item.path, out / "data" / "post_training" / stage / f"{name}.zst")


def _memorization(recipe: Recipe, artifacts: dict[str, Artifact], model: Any, tok: Any,
                  generations: list[dict[str, Any]], out: Path) -> dict[str, Any]:  # fmt: skip
    """k-extractable memorization on documents of each training stage behind the model, personal-data patterns in the
    generations and, from the trace index (when the release has one and infini-gram is installed), what it covers,
    the generations' spans found in the training data and the evaluated items' 13-gram overlap with it."""
    fits = model.cfg.context >= memorization.PREFIX + memorization.SUFFIX  # a prompt and its continuation
    behind = {name: artifacts[name] for name in resolve(recipe, [final_model(recipe)]) if name in artifacts}
    sets = [s for s in training_sets(behind) if s[0] not in memorization.UNSAMPLED] if fits else []
    documents = [doc for stage, folder, stem, dtype, _ in sets
                 for doc in memorization.sample_documents(folder, stem, dtype, memorization.DOCUMENTS, recipe.seed,
                                                          stage)]  # fmt: skip
    texts = [g["completion"] for g in generations]
    spans, contaminated, traced, covered = None, {}, [], None
    if (out / "trace" / "index.json").is_file():
        covered = json.loads((out / "trace" / "index.json").read_text())["stages"]
        with contextlib.suppress(InputError):  # infini-gram not installed: the index is there, the figures are not
            index = open_index(out / "trace")
            spans = memorization.verbatim_spans(index, [tok.encode(t, add_special_tokens=False).ids for t in texts])
            traced = memorization.traced(index, tok, texts)
            if (samples := artifacts["eval"].path / "samples.jsonl").is_file():
                contaminated = contamination(index, tok, samples)
    return {"trace_index": covered, "extractable": memorization.extractable(model, documents) if documents else None,
            "generation_spans": spans, "personal_data_in_generations": memorization.personal_data(texts),
            "contamination": contaminated, "traced_generations": traced}  # fmt: skip


def _lineage(recipe: Recipe, artifacts: dict[str, Artifact], base_dir: Path) -> dict[str, Any]:
    """Every stage behind the release (digest, config, inputs, output hashes, environment) and, for a model
    trained from an outside folder, that folder's digest and audit."""
    lineage = {name: {**art.ref(), **{k: art.manifest.get(k) for k in ("config", "inputs", "outputs", "environment",
                                                                       "created", "sources")}}
               for name, art in artifacts.items()}  # fmt: skip
    for name, art in artifacts.items():
        if spec(name).distributed:
            lineage[name]["world_size"] = art.metrics.get("world_size", 1)
    if (outside := outside_base(recipe)) is not None:
        stage, folder = outside
        lineage["base_model"] = _base_model(base_dir, folder, artifacts[stage].manifest["sources"]["base"])
    return lineage


def build_stage(run: StageRun, out: Path) -> dict[str, Any]:
    """The release stage: the folder described at the top of this module, from every stage the run made."""
    return build_release(run.loaded, run.inputs, out)


def build_release(loaded: LoadedRecipe, artifacts: dict[str, Artifact], out: Path) -> dict[str, Any]:
    """The release folder of a run. A model trained from an outside folder has no pretraining log, checkpoints
    or token counts; a recipe without `[data]` has no corpus in it."""
    recipe, base_dir = loaded.recipe, loaded.base_dir
    model, tok, eos_id = _write_model(recipe, artifacts, out)
    _write_recipe(loaded, out)
    _copy_stage_files(artifacts, out)
    _write_data(loaded, artifacts, out)
    lineage = _lineage(recipe, artifacts, base_dir)
    _dump(out / "lineage.json", lineage)
    _code_snapshot(out / "code")
    _user_verifiers(loaded, artifacts, out / "code" / "verifiers")
    data = artifacts.get("data")
    generations = _generations(model, tok, eos_id, data.path / "validation.jsonl" if data else None)
    with open(out / "eval" / "generations.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    memorized = _memorization(recipe, artifacts, model, tok, generations, out)
    _dump(out / "eval" / "memorization.json", memorized)
    train = artifacts.get("train")
    ctx = {
        "name": recipe.release.name or recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "data": data.metrics if data else None,
        "train": train.metrics if train is not None else None,
        "base_model": lineage.get("base_model"),
        "eval": artifacts["eval"].metrics,
        "model": asdict(model.cfg),
        "parameters": model.num_params(),
        "vocab_size": model.cfg.vocab_size,
        "clearlm_version": __version__,
        "post_training": {name: artifacts[name].metrics for name in post_training(recipe, list(artifacts))},
        "stages": {name: art.metrics for name, art in artifacts.items()},
        "lineage": {k: a.digest for k, a in artifacts.items()},
        "memorization": memorized,
    }
    dataset_licences, eval_licences = _licences(recipe, base_dir, artifacts)
    components = release_components(recipe, out, dataset_licences, eval_licences, will_write=_GENERATED_FILES,
                                    pretrained_here=train is not None)  # fmt: skip
    report = openness_report(recipe, components)
    _dump(out / "openness.json", {**report, "information": {"memorization": memorized}})  # not a class criterion
    created = artifacts[final_model(recipe)].manifest["created"][:10]
    (out / "mot.yml").write_text(mot_yaml(recipe, components, created))
    (out / "README.md").write_text(model_card(ctx) + "\n" + "\n".join(memorization.card_lines(memorized)) + "\n"
                                   + card_section(report))  # fmt: skip
    logs = {name: list(read_jsonl(out / log)) for name in artifacts if (log := spec(name).log)}
    samples = artifacts["eval"].path / "samples.jsonl"
    answered = [row for row in read_jsonl(samples) if "generations" in row] if samples.is_file() else []
    (out / "report.html").write_text(technical_report(ctx, logs, report, generations, answered))
    return {
        "name": ctx["name"],
        "parameters": ctx["parameters"],
        "lineage": ctx["lineage"],
        "mof_class": report["mof"]["label"],
        "osaid_complete": report["osaid"]["complete"],
    }
