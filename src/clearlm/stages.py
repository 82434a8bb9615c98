"""What stages exist: the one table that `run`, `run --plan`, `verify`, the release, its cards and its report
loop over.

A stage is a `StageSpec` here plus a build function in its own package, named by its import path and imported
only when the stage builds, so that the table, `--plan` and the artifacts' digests are worked out without
torch. The graph comes from the recipe: a stage runs when the recipe asks for it (its section is present) or a
later stage needs it; `needs` says which earlier stages a stage reads, given the recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clearlm.errors import RecipeError
from clearlm.recipe import GUARD_SETTINGS, DataConfig, LoadedRecipe, Recipe

if TYPE_CHECKING:
    from clearlm.artifacts import Artifact
    from clearlm.world import World


class Reporter:
    """How a pipeline tells its caller what happens; the CLI renders it, tests record it."""

    def stage_started(self, kind: str) -> None: ...

    def stage_skipped(self, kind: str, artifact: Artifact) -> None: ...

    def stage_finished(self, kind: str, artifact: Artifact) -> None: ...

    def train_step(self, record: dict[str, Any]) -> None: ...

    def data_progress(self, steps: dict[str, tuple[int, int]]) -> None:
        """Documents and bytes that have entered each cleaning step so far."""

    def note(self, message: str) -> None: ...


@dataclass
class StageRun:
    """What a build function is given: the recipe, its input artifacts by stage name, and how to run."""

    loaded: LoadedRecipe
    inputs: dict[str, Artifact]
    reporter: Reporter
    world: World
    resume: bool = False
    stop_after: int | None = None  # stop (as if interrupted) after this many steps; the build returns None

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def base_dir(self) -> Path:
        return self.loaded.base_dir


Build = Callable[[StageRun, Path], "dict[str, Any] | None"]


@dataclass(frozen=True)
class StageSpec:
    """One stage. `build` is "module:function"; the function writes the stage's files into the folder it is
    given and returns its metrics (None: stopped early, to be resumed)."""

    name: str  # the artifact kind, the key in lineage.json
    label: str  # in plans, cards and reports
    build: str
    needs: Callable[[Recipe], tuple[str, ...]]  # the earlier stages it reads
    config: Callable[[LoadedRecipe], Any]  # the settings that decide its output, hashed into its digest
    identity: Callable[[LoadedRecipe], Any] | None = None  # digests of what it reads from outside the work dir
    asked: Callable[[Recipe], bool] = lambda recipe: False  # the recipe asks for it (else: only when needed)
    resumes: Literal["parts", "checkpoints"] | None = None  # keeps finished parts; or continues with --resume
    model: bool = False  # produces a model: the last one the recipe asks for is the one released
    own_tokenizer: bool = False  # its folder holds its model's tokenizer (else: the tokenizer stage's)
    pretraining: bool = False  # its model is a base model (what post-training's `base = "pretrain"` means)
    distributed: bool = False  # every torchrun rank takes part
    torch: bool = True  # computes with torch: its thread count and math modes are set first and recorded
    release: dict[str, str] = field(default_factory=dict)  # its file (or glob: into a folder) -> the release's copy
    datasets: str | None = None  # a corpus stage: the release folder of its cleaned splits (and its data card)
    card: str | None = None  # "module:function" (recipe dict, metrics) -> the model card's lines about it
    report: str | None = None  # "module:function" (recipe dict, metrics, log) -> the report's HTML about it
    checkpoints: str | None = None  # the release folder that keeps its intermediate weights (step-*/)
    resume_from: str = "checkpoints"  # the folders (glob) in its partial folder that hold its checkpoints
    timed: tuple[str, ...] = ()  # files (globs) holding wall-clock times: compared without them
    # its trained-on tokens go into the trace index under this name: a token shards stage's training split, or a model
    # stage's trained sequences (`train/trained.py`)
    indexed_as: str | None = None

    def load(self) -> Build:
        return _function(self.build)

    @property
    def log(self) -> str | None:
        """Where the release keeps this stage's per-step log."""
        return self.release.get("log.jsonl")


def _function(path: str) -> Any:
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


def describe(stage: str, kind: str, *args: Any) -> list[str]:
    """What a stage says of itself in the model card (`kind` "card") or the technical report ("report")."""
    hook = getattr(spec(stage), kind)
    return _function(hook)(*args) if hook else []


def _present(section: str) -> Callable[[Recipe], bool]:
    return lambda recipe: getattr(recipe, section) is not None


def final_model(recipe: Recipe) -> str:
    """The stage whose model the recipe releases: the last model stage it asks for, else pretraining."""
    asked = [s.name for s in table() if s.model and s.asked(recipe)]
    return asked[-1] if asked else "train"


def model_inputs(stage: str) -> tuple[str, ...]:
    """What reading a stage's model takes: the stage, and the tokenizer stage when the model has none of its own."""
    return (stage,) if spec(stage).own_tokenizer else ("tokenizer", stage)


def base_stage(recipe: Recipe, base: str, stage: str) -> str | None:
    """The stage that `stage`'s `base` names: "pretrain" is the recipe's last pretraining stage before it (one that
    makes a base model), another stage's name that stage; None for a model folder."""
    before = names()[: names().index(stage)]
    if base == "pretrain":
        return [s for s in before if spec(s).pretraining and (spec(s).asked(recipe) or s == "train")][-1]
    return base if base in before and spec(base).model else None


def post_training(recipe: Recipe, among: list[str] | None = None) -> list[str]:
    """The model stages after pretraining (SFT, DPO, ...) among `among` (default: those the recipe asks for)."""
    return [s.name for s in table() if s.model and not s.pretraining and (s.name in among if among is not None
                                                                           else s.asked(recipe))]  # fmt: skip


def outside_base(recipe: Recipe) -> tuple[str, str] | None:
    """(stage, folder) when the released model's training started from a model folder that this recipe did not
    train: the stage that read the folder, and the folder."""
    stage = final_model(recipe)
    while isinstance(base := getattr(getattr(recipe, stage, None), "base", None), str):
        upstream = base_stage(recipe, base, stage)
        if upstream is None:
            return stage, base
        stage = upstream
    return None


def _post_training_needs(section: str) -> Callable[[Recipe], tuple[str, ...]]:
    def needs(recipe: Recipe) -> tuple[str, ...]:
        cfg = getattr(recipe, section)
        stage = base_stage(recipe, cfg.base, section)
        return (("data",) if cfg.builtin else ()) + (model_inputs(stage) if stage else ())

    return needs


def _eval_needs(recipe: Recipe) -> tuple[str, ...]:
    """Every corpus the recipe has (bits per byte on each validation split) and the final model."""
    return tuple(s.name for s in table() if s.datasets and s.asked(recipe)) + model_inputs(final_model(recipe))


def _trace_needs(recipe: Recipe) -> tuple[str, ...]:
    """Every stage behind the released model that trained on data: the corpora (pretraining's and mid-training's
    token shards) and the post-training stages (their trained sequences)."""
    graph = resolve(recipe, [final_model(recipe)])
    return tuple(s.name for s in table() if s.indexed_as and s.name in graph)


def _release_needs(recipe: Recipe) -> tuple[str, ...]:
    """Everything the run made: the release's lineage lists every stage behind it."""
    return tuple(name for name in resolve(recipe, [s.name for s in table() if s.asked(recipe)] + ["eval"]))


def _corpus_config(section: Callable[[Recipe], DataConfig]) -> Callable[[LoadedRecipe], Any]:
    """A corpus stage's settings (those that decide its output), from the recipe section `section` picks."""

    def config(loaded: LoadedRecipe) -> Any:
        from clearlm.data.sources import data_config

        return data_config(section(loaded.recipe))

    return config


def _corpus_identity(section: Callable[[Recipe], DataConfig]) -> Callable[[LoadedRecipe], Any]:
    """A corpus stage's raw inputs: the digests of its source files (or of the built-in corpus)."""

    def identity(loaded: LoadedRecipe) -> Any:
        from clearlm.data.sources import data_identity

        return data_identity(section(loaded.recipe), loaded.base_dir)

    return identity


def _train_config(loaded: LoadedRecipe) -> Any:
    r = loaded.recipe
    return {"seed": r.seed, "model": r.model.model_dump(mode="json"),
            "train": r.train.model_dump(mode="json", exclude=GUARD_SETTINGS)}  # fmt: skip


def _post_training_config(section: str) -> Callable[[LoadedRecipe], Any]:
    def config(loaded: LoadedRecipe) -> Any:
        settings = getattr(loaded.recipe, section).model_dump(mode="json", exclude=GUARD_SETTINGS)
        return {"seed": loaded.recipe.seed, **settings}

    return config


def _post_training_identity(section: str) -> Callable[[LoadedRecipe], Any]:
    def identity(loaded: LoadedRecipe) -> Any:
        from clearlm.data.sources import post_training_sources

        return post_training_sources(getattr(loaded.recipe, section), loaded.base_dir, loaded.recipe.tokenizer)[1]

    return identity


def _rlvr_identity(loaded: LoadedRecipe) -> Any:
    """RLVR's prompt files and base folder, and the files of the user's verifier functions: their code decides the
    rewards."""
    from clearlm.data.sources import files_digest

    identity = _post_training_identity("rlvr")(loaded)
    user = [v.function.rpartition(":")[0] for v in loaded.recipe.rlvr.verifiers if v.function]
    return {**identity, "verifiers": [{"file": f, "digest": files_digest([loaded.base_dir / f], loaded.base_dir)}
                                      for f in user]}  # fmt: skip


def _eval_identity(loaded: LoadedRecipe) -> Any:
    """The digests of the tasks' data files outside the work dir (a file in the run's data split is covered by
    the data stage's digest)."""
    from clearlm.data.sources import files_digest
    from clearlm.eval.taskspec import resolve_tasks

    cfg, base = loaded.recipe.eval, loaded.base_dir
    dirs = [base / cfg.data_dir] if cfg.data_dir else []
    task_data = {}
    for task in resolve_tasks(cfg.tasks, [base / f for f in cfg.task_files]):
        found = [d / task.data_file for d in (*dirs, task.base_dir) if d is not None and (d / task.data_file).is_file()]
        if found:
            task_data[task.name] = files_digest(found[:1], base)
    return {"task_data": task_data}


def _midtrain_base(loaded: LoadedRecipe) -> Any:
    """A model folder that mid-training continues: its digest (its tokenizer too), with the recipe's token settings,
    which decide the tokens added to it."""
    from clearlm.data.sources import folder_digest

    cfg = loaded.recipe.midtrain
    if cfg.base == "pretrain":
        return None
    return {
        "base": folder_digest(loaded.base_dir / cfg.base),
        "tokenizer": loaded.recipe.tokenizer.model_dump(mode="json"),
    }


def _midtrain_needs(recipe: Recipe) -> tuple[str, ...]:
    base = base_stage(recipe, recipe.midtrain.base, "midtrain")
    return ("mid_data", "mid_shards") + (model_inputs(base) if base else ())


def _midtrain_config(loaded: LoadedRecipe) -> Any:
    r = loaded.recipe
    return {"seed": r.seed, "train": _train_config(loaded)["train"],
            "midtrain": r.midtrain.model_dump(mode="json", exclude={"data", *GUARD_SETTINGS}),
            "eval": r.eval.model_dump(mode="json", include={"batch_size", "max_documents_per_domain"})}  # fmt: skip


def _section(name: str) -> Callable[[LoadedRecipe], Any]:
    return lambda loaded: getattr(loaded.recipe, name).model_dump(mode="json")


def _corpus_stage(
    name: str, label: str, build: str, section: Callable[[Recipe], DataConfig], datasets: str,
    asked: Callable[[Recipe], bool] | None = None,
) -> StageSpec:  # fmt: skip
    """A cleaned, split corpus from a `DataConfig` section: finished parts kept, no torch."""
    return StageSpec(name, label, build, needs=lambda recipe: (), config=_corpus_config(section),
                     identity=_corpus_identity(section), asked=asked or _present(name), resumes="parts", torch=False,
                     datasets=datasets)  # fmt: skip


def _post_training_stage(name: str, label: str, build: str, indexed_as: str) -> StageSpec:
    """SFT, DPO: a `[name]` section with a `base` (an earlier stage or a model folder) and chat data."""
    return StageSpec(name, label, build, needs=_post_training_needs(name), config=_post_training_config(name),
                     identity=_post_training_identity(name), asked=_present(name), resumes="checkpoints", model=True,
                     own_tokenizer=True, release={"log.jsonl": f"post_training/{name}_log.jsonl"},
                     timed=("log.jsonl",), indexed_as=indexed_as)  # fmt: skip


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        _corpus_stage("data", "Data", "clearlm.data.corpus:build_stage", lambda r: r.data, "data/datasets"),
        StageSpec("tokenizer", "Tokenizer", "clearlm.data.tokenizer:build_stage", needs=lambda r: ("data",),
                  config=_section("tokenizer"), torch=False),
        StageSpec("shards", "Token shards", "clearlm.data.shards:build_stage", needs=lambda r: ("data", "tokenizer"),
                  config=lambda loaded: {}, indexed_as="pretraining"),
        StageSpec("train", "Pretraining", "clearlm.train.loop:build_stage", needs=lambda r: ("shards", "tokenizer"),
                  config=_train_config, resumes="checkpoints", model=True, pretraining=True, distributed=True,
                  release={"log.jsonl": "training/log.jsonl"}, checkpoints="checkpoints",
                  timed=("log.jsonl", "checkpoints/*/state.json", "checkpoints/*/checksums.json")),
        _corpus_stage("mid_data", "Mid-training data", "clearlm.train.midtrain:build_data", lambda r: r.midtrain.data,
                      "data/midtrain_datasets", asked=_present("midtrain")),
        StageSpec("mid_shards", "Mid-training token shards", "clearlm.train.midtrain:build_shards",
                  needs=lambda r: ("mid_data",) + (("tokenizer",) if r.midtrain.base == "pretrain" else ()),
                  config=lambda loaded: {}, identity=_midtrain_base, indexed_as="mid-training"),
        StageSpec("midtrain", "Mid-training", "clearlm.train.midtrain:build_stage", needs=_midtrain_needs,
                  config=_midtrain_config, identity=_midtrain_base, asked=_present("midtrain"),
                  resumes="checkpoints", model=True, own_tokenizer=True, pretraining=True, distributed=True,
                  release={"log.jsonl": "midtraining/log.jsonl", "ingredients/*/model.safetensors": "midtraining"},
                  timed=("log.jsonl", "ingredients/*/log.jsonl", "ingredients/*/checkpoints/*/state.json",
                         "ingredients/*/checkpoints/*/checksums.json"),
                  resume_from="ingredients/*/checkpoints", card="clearlm.train.midtrain:card_lines",
                  report="clearlm.train.midtrain:report_section"),
        _post_training_stage("sft", "Supervised fine-tuning", "clearlm.train.sft:build_stage", "SFT"),
        _post_training_stage("dpo", "Preference tuning (DPO)", "clearlm.train.dpo:build_stage", "DPO"),
        StageSpec("rlvr", "Reinforcement learning (RLVR)", "clearlm.train.rlvr:build_stage",
                  needs=_post_training_needs("rlvr"), config=_post_training_config("rlvr"), identity=_rlvr_identity,
                  asked=_present("rlvr"), resumes="checkpoints", model=True, own_tokenizer=True,
                  release={"log.jsonl": "post_training/rlvr_log.jsonl",
                           "completions.jsonl": "post_training/rlvr_completions.jsonl"},
                  timed=("log.jsonl",), card="clearlm.train.rlvr:card_lines",
                  report="clearlm.train.rlvr:report_section", indexed_as="RL prompts"),
        StageSpec("eval", "Evaluation", "clearlm.eval.run:build_stage", needs=_eval_needs, config=_section("eval"),
                  identity=_eval_identity, release={"results.json": "eval/results.json",
                                                    "samples.jsonl": "eval/samples.jsonl"}),
        StageSpec("trace", "Trace index", "clearlm.trace.index:build_stage", needs=_trace_needs,
                  config=lambda loaded: {}, asked=lambda r: r.release.trace_index, torch=False,
                  release={"*.0": "trace", "index.json": "trace/index.json"}),
        StageSpec("release", "Release", "clearlm.release.build:build_stage", needs=_release_needs,
                  config=lambda loaded: {"name": loaded.recipe.name, **loaded.recipe.release.model_dump(mode="json")}),
    )
}  # fmt: skip


def table() -> list[StageSpec]:
    """The stages in the order they run."""
    return list(STAGES.values())


def names() -> list[str]:
    return list(STAGES)


def spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise RecipeError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return STAGES[name]


def _require_section(recipe: Recipe, stage: StageSpec, path: list[str]) -> None:
    """A stage with a section of its own that the recipe leaves out cannot run, whoever needs it."""
    section = stage.name if stage.name in Recipe.model_fields else None
    if section is not None and getattr(recipe, section) is None:
        by = f" (needed by {' <- '.join(reversed(path))})" if path else ""
        hint = ': add one, or post-train a model folder (sft.base = "folder")' if section == "data" else ""
        raise RecipeError(f"the recipe has no [{section}] section{by}{hint}")


def resolve(recipe: Recipe, targets: list[str]) -> list[str]:
    """The stages that building `targets` runs, in table order."""
    found: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in found:
            return
        stage = spec(name)
        _require_section(recipe, stage, path)
        found.add(name)
        for upstream in stage.needs(recipe):
            visit(upstream, [*path, name])

    for target in targets:
        visit(target, [])
    return [name for name in STAGES if name in found]
