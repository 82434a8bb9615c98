"""The stage graph behind `clearlm run`: data -> tokenizer -> shards -> train -> eval -> release.

Each stage is looked up by its digest first; only missing or outdated artifacts are built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from clearlm.artifacts import Artifact, ArtifactStore, compute_digest
from clearlm.data.chat import BadRow, ChatTemplate, read_sft, tokenize_pair
from clearlm.data.chat import read_preferences as read_pair_file
from clearlm.data.corpus import build_corpus, data_config, data_identity
from clearlm.data.documents import read_jsonl
from clearlm.data.instructions import LICENSE as INSTRUCTIONS_LICENSE
from clearlm.data.instructions import stdlib_function_examples, stdlib_function_pairs
from clearlm.data.shards import write_shards
from clearlm.data.sources import files_digest
from clearlm.data.tokenizer import load_tokenizer, own_tokenizer, train_tokenizer
from clearlm.errors import ArtifactError, DiskFullError, RecipeError
from clearlm.eval.harness import evaluate_tasks
from clearlm.eval.perplexity import domain_bits_per_byte
from clearlm.eval.results import write_samples
from clearlm.eval.taskspec import resolve_tasks
from clearlm.model.transformer import Transformer
from clearlm.model.weights import load_model, save_model
from clearlm.numerics import begin_stage, cnr_not_in_effect, stage_threads
from clearlm.recipe import GUARD_SETTINGS, DPOConfig, LoadedRecipe, SFTConfig, TokenizerConfig
from clearlm.release.build import build_release
from clearlm.release.load import load_release
from clearlm.storage import bytes_under, disk_full, failed_path, free_bytes, human
from clearlm.train.checkpoint import latest_checkpoint
from clearlm.train.distributed import barrier, world
from clearlm.train.dpo import (
    TokenizedPair,
    preference_accuracy,
    reference_logps,
    split_held_out,
    train_dpo,
    truncate,
)
from clearlm.train.loop import pretrain
from clearlm.train.perf import keep_freed_memory
from clearlm.train.sft import prepare, train_sft

STAGES = ("data", "tokenizer", "shards", "train", "sft", "dpo", "eval", "release")
RESUMABLE = ("data", "train", "sft", "dpo")


class Reporter:
    """How a pipeline tells its caller what happens; the CLI renders it, tests record it."""

    def stage_started(self, kind: str) -> None: ...

    def stage_skipped(self, kind: str, artifact: Artifact) -> None: ...

    def stage_finished(self, kind: str, artifact: Artifact) -> None: ...

    def train_step(self, record: dict[str, Any]) -> None: ...

    def data_progress(self, steps: dict[str, tuple[int, int]]) -> None:
        """Documents and bytes that have entered each cleaning step so far."""

    def note(self, message: str) -> None: ...


_FIELD_PREFIX = re.compile(r"^\w+(\[\d+\])?: ")  # "messages[2]: role must be ..." counts as "role must be ..."


def _folder_digest(folder: Path) -> str:
    return files_digest(sorted(p for p in folder.rglob("*") if p.is_file()), folder)


def post_training_sources(
    cfg: SFTConfig | DPOConfig, base: Path, tok_cfg: TokenizerConfig
) -> tuple[list[Path], dict[str, Any]]:
    """The stage's data files and the digests that identify them (and a base or reference folder, with the
    recipe's tokenizer settings, which decide the chat tokens added to a folder's tokenizer)."""
    files = [base / d.path for d in cfg.data]
    extra: dict[str, Any] = {"data": [{"path": d.path, "digest": files_digest([f], base)}
                                      for d, f in zip(cfg.data, files, strict=True)]}  # fmt: skip
    if cfg.base not in ("pretrain", "sft"):
        extra["base"] = _folder_digest(base / cfg.base)
        extra["tokenizer"] = tok_cfg.model_dump(mode="json")
    if getattr(cfg, "reference", None):
        extra["reference"] = _folder_digest(base / cfg.reference)
    return files, extra


def _read_rows(files: list[Path], reader: Callable[[Path], Any], out: Path) -> tuple[list[Any], dict[str, int]]:
    """Good rows of every file; bad ones go to `out/rejects.jsonl` with file, line and reason, and are counted."""
    rows, bad, rejects = [], Counter(), []
    for file in files:
        for where, row in reader(file):
            if isinstance(row, BadRow):
                bad[_FIELD_PREFIX.sub("", str(row))] += 1
                rejects.append({"where": where, "reason": str(row)})
            else:
                rows.append(row)
    write_samples(out / "rejects.jsonl", rejects)
    return rows, dict(bad)


def _licences(cfg: SFTConfig | DPOConfig) -> dict[str, str]:
    licences = {d.path: d.license for d in cfg.data}
    if cfg.builtin:
        licences[cfg.builtin] = INSTRUCTIONS_LICENSE
    return licences


def base_model(folder: Path, tok_cfg: TokenizerConfig) -> tuple[Transformer, Tokenizer]:
    """A Llama-family model folder to post-train. Chat tokens its tokenizer lacks are added as special
    tokens, and the embeddings grow to match (new rows at the mean of the old ones)."""
    model, tok, _ = load_release(folder)
    if not isinstance(model, Transformer):
        raise RecipeError(f"sft.base: {folder}: only Llama-family model folders can be post-trained")
    missing = [t for t in (tok_cfg.eos_token, tok_cfg.pad_token, *tok_cfg.special_tokens) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
        model.grow_vocab(tok.get_vocab_size(), [tok.token_to_id(t) for t in missing])
    return model, tok


class Pipeline:
    """The recipe's stages in `workdir`. `threads` fixes a stage's thread count (as `verify` does, to re-run a
    stage with the count its artifact recorded); otherwise it is `train.threads`, else this process's cores."""

    def __init__(
        self, loaded: LoadedRecipe, workdir: Path, reporter: Reporter | None = None,
        threads: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.workdir = Path(workdir)
        self.store = ArtifactStore(self.workdir / "artifacts")
        self.reporter = reporter or Reporter()
        self.threads = threads or {}
        self._done: dict[str, Artifact] = {}
        self._warned = False

    def _begin(self, kind: str, processes: int = 1) -> dict[str, Any]:
        """Set the process state the stage's numbers depend on, whatever ran before it (see `numerics`), and
        the allocator options training wants, for every stage alike."""
        keep_freed_memory()
        info = begin_stage(self.threads.get(kind) or stage_threads(self.recipe.train.threads, processes))
        if (warning := cnr_not_in_effect(info)) and not self._warned:
            self.reporter.note(warning)
            self._warned = True
        return info

    @property
    def artifacts(self) -> dict[str, Artifact]:
        """The artifacts built or found so far, in stage order."""
        return dict(self._done)

    def _stage(
        self,
        kind: str,
        config: Any,
        inputs: dict[str, Artifact],
        build: Callable[[Path], dict[str, Any] | None],
        extra: Any = None,
        keep_partial: bool = False,
        processes: int = 1,
        resume: bool | None = None,
    ) -> Artifact | None:
        """Find the stage's artifact, or build it holding its lock (another run may be building it: then wait
        and find it). `resume` (for stages that checkpoint) says whether an interrupted build continues."""
        digest = compute_digest(kind, config, inputs, extra)
        found = self.store.lookup(kind, digest)
        if found is None:
            with self.store.building(kind, digest, self.reporter.note):
                found = self.store.lookup(kind, digest)
                if found is None:
                    if resume is not None:
                        self._announce_resume(kind, digest, resume)
                    return self._build(kind, digest, config, inputs, build, extra, keep_partial, processes)
        self.reporter.stage_skipped(kind, found)
        return found

    def _build(
        self, kind: str, digest: str, config: Any, inputs: dict[str, Artifact],
        build: Callable[[Path], dict[str, Any] | None], extra: Any, keep_partial: bool, processes: int,
    ) -> Artifact | None:  # fmt: skip
        for art in inputs.values():  # a flipped bit in an input stops the stage before it reads the file
            self.store.require_intact(art)
        self.reporter.stage_started(kind)
        started = time.perf_counter()
        work = self.store.start(kind, digest, keep_partial=keep_partial)
        numerics = self._begin(kind, processes)
        try:
            metrics = build(work)
            if metrics is None:
                return None
            seconds = time.perf_counter() - started
            art = self.store.finish(kind, digest, config, inputs, metrics, seconds, sources=extra, numerics=numerics)
        except BaseException as err:
            full = disk_full(err)
            written = bytes_under(work) if full else 0
            if kind not in RESUMABLE:  # a failed stage leaves nothing half-written; data and train keep their work
                shutil.rmtree(work, ignore_errors=True)
            if full:
                raise self._disk_full(kind, full, work, written) from None
            raise
        self.reporter.stage_finished(kind, art)
        return art

    @staticmethod
    def _disk_full(kind: str, err: Exception, work: Path, written: int) -> DiskFullError:
        """One line: where, how much is free (or, for a write that checked first, how much it needs), and what to
        do so that nothing kept is thrown away."""
        if kind in ("train", "sft", "dpo"):
            then = ("run again with --resume to continue from its last checkpoint"
                    if latest_checkpoint(work / "checkpoints") else "run again")  # fmt: skip
        else:
            then = "run again: its finished parts are kept" if kind in RESUMABLE else "run again"
        if isinstance(err, DiskFullError):
            return DiskFullError(f"{err}; once space is freed, {then}")
        where, free = failed_path(err, work), human(free_bytes(work))
        return DiskFullError(f"{where}: no space left on the device ({free} free) while building {kind}, after "
                             f"writing {human(written)}; once space is freed, {then}")  # fmt: skip

    def data(self) -> Artifact:
        if "data" not in self._done:
            cfg, base = self.recipe.data, self.loaded.base_dir
            self._done["data"] = self._stage(
                "data",
                data_config(cfg),
                {},
                lambda out: build_corpus(cfg, base, out, self.reporter.data_progress),
                extra=data_identity(cfg, base),
                keep_partial=True,
            )
        return self._done["data"]

    def tokenizer(self) -> Artifact:
        if "tokenizer" not in self._done:
            data, cfg = self.data(), self.recipe.tokenizer
            self._done["tokenizer"] = self._stage(
                "tokenizer",
                cfg.model_dump(mode="json"),
                {"data": data},
                lambda out: train_tokenizer(cfg, data.path / "train.jsonl", out),
            )
        return self._done["tokenizer"]

    def shards(self) -> Artifact:
        if "shards" not in self._done:
            data, tok_art = self.data(), self.tokenizer()

            def build(out: Path) -> dict[str, Any]:
                tok = load_tokenizer(tok_art.path)
                return write_shards(tok, tok.token_to_id(self.recipe.tokenizer.eos_token), data.path, out)

            self._done["shards"] = self._stage("shards", {}, {"data": data, "tokenizer": tok_art}, build)
        return self._done["shards"]

    def _train_config(self) -> dict[str, Any]:
        return {"seed": self.recipe.seed, "model": self.recipe.model.model_dump(mode="json"),
                "train": self.recipe.train.model_dump(mode="json", exclude=GUARD_SETTINGS)}  # fmt: skip

    def train(self, resume: bool = False, stop_after: int | None = None) -> Artifact | None:
        """Train (or find) the model; None when `stop_after` interrupted it before max_steps, and on every
        torchrun rank but the first, which only compute (rank 0 builds the data stages and the artifact)."""
        if "train" not in self._done:
            w = world()
            if w.main:
                shards, tok_art = self.shards(), self.tokenizer()
            barrier(w)
            if not w.main:
                shards, tok_art = self.shards(), self.tokenizer()  # rank 0 built them: found by digest

            def run(out: Path) -> dict[str, Any]:
                return pretrain(
                    self.recipe,
                    shards.path,
                    shards.metrics,
                    tok_art.metrics["vocab_size"],
                    out,
                    resume=resume,
                    stop_after=stop_after,
                    on_step=self.reporter.train_step,
                    on_note=self.reporter.note,
                    w=w,
                )

            def build(out: Path) -> dict[str, Any] | None:
                barrier(w)  # the other ranks wait until the working directory exists
                metrics = run(out)
                return None if "stopped_at" in metrics else metrics

            config, inputs = self._train_config(), {"shards": shards, "tokenizer": tok_art}
            digest = compute_digest("train", config, inputs)
            if not w.main:
                if self.store.lookup("train", digest) is None:
                    barrier(w)
                    self._begin("train", w.size)
                    run(self.store.partial_path("train", digest))
                return None
            art = self._stage("train", config, inputs, build, keep_partial=resume, processes=w.size, resume=resume)
            if art is None:
                return None
            self._done["train"] = art
        return self._done["train"]

    def _announce_resume(self, kind: str, digest: str, resume: bool) -> None:
        found = latest_checkpoint(self.store.partial_path(kind, digest) / "checkpoints")
        if found and resume:
            self.reporter.note(f"{kind}: resuming from {found.name}")
        elif found:
            self.reporter.note(f"{kind}: discarding an interrupted run at {found.name} (pass --resume to continue it)")
        elif resume:
            self.reporter.note(f"{kind}: nothing to resume, starting from step 0")

    def final_model(self, resume: bool = False) -> tuple[str, Artifact]:
        """The stage whose model the recipe releases: DPO, else SFT, else pretraining."""
        if self.recipe.dpo is not None:
            return "dpo", self.dpo(resume)
        if self.recipe.sft is not None:
            return "sft", self.sft(resume)
        return "train", self._require_train(resume)

    def eval(self, resume: bool = False) -> Artifact:
        if "eval" not in self._done:
            data = self.data()
            final, train = self.final_model(resume)
            inputs = {"data": data, final: train}
            if not own_tokenizer(train.path):
                inputs["tokenizer"] = self.tokenizer()
            tok_dir = inputs.get("tokenizer", train).path
            cfg = self.recipe.eval
            base = self.loaded.base_dir
            specs = resolve_tasks(cfg.tasks, [base / f for f in cfg.task_files])
            data_dirs = ([base / cfg.data_dir] if cfg.data_dir else []) + [data.path]
            task_data = {s.name: files_digest([s.data_path(data_dirs)], base) for s in specs}

            def build(out: Path) -> dict[str, Any]:
                tok = load_tokenizer(tok_dir)
                eos_id = tok.token_to_id(self.recipe.tokenizer.eos_token)
                trained = load_model(train.path)
                untrained = Transformer(trained.cfg)
                untrained.init_weights(self.recipe.seed)
                metrics: dict[str, Any] = {}
                if cfg.bpb:
                    for key, model in (("bits_per_byte", trained), ("untrained_bits_per_byte", untrained)):
                        docs = read_jsonl(data.path / "validation.jsonl")
                        metrics[key] = domain_bits_per_byte(
                            model, tok, docs, eos_id, cfg.batch_size, cfg.max_documents_per_domain
                        )
                if specs:
                    task_tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))  # lm-eval's special-token rules
                    metrics["tasks"], samples = evaluate_tasks(
                        trained, task_tok, specs, data_dirs, prefix_id=eos_id, num_fewshot=cfg.num_fewshot,
                        limit=cfg.limit, batch_size=cfg.batch_size,
                    )  # fmt: skip
                    write_samples(out / "samples.jsonl", samples)
                (out / "results.json").write_text(json.dumps(metrics, indent=2) + "\n")
                return metrics

            self._done["eval"] = self._stage(
                "eval",
                cfg.model_dump(mode="json"),
                inputs,
                build,
                extra={"task_data": task_data},
            )
        return self._done["eval"]

    def sft(self, resume: bool = False, stop_after: int | None = None) -> Artifact | None:
        """Supervised fine-tuning of the recipe's model (or of `sft.base`, a model folder) on chat data;
        None when `stop_after` stopped it (continue with `resume`)."""
        if "sft" not in self._done:
            cfg, inputs, files, extra = self._post_training_setup("sft", resume)

            def build(out: Path) -> dict[str, Any]:
                model, tok = self._starting_model(cfg, inputs)
                examples, bad = _read_rows(files, read_sft, out)
                if cfg.builtin:
                    examples = (
                        stdlib_function_examples(inputs["data"].path / "train.jsonl", cfg.builtin_examples) + examples
                    )
                template = ChatTemplate(eos_token=self.recipe.tokenizer.eos_token)
                max_length = min(cfg.max_length or model.cfg.context, model.cfg.context)
                items, counts = prepare(examples, tok, template, max_length)
                pad_id = tok.token_to_id(self.recipe.tokenizer.pad_token)
                metrics = train_sft(model, items, cfg, self.recipe.seed, pad_id, out, self.reporter.train_step,
                                    resume=resume, stop_after=stop_after)  # fmt: skip
                if metrics is None:
                    return None
                save_model(model, out)
                tok.save(str(out / "tokenizer.json"))
                return {**metrics, "counts": dict(counts), "bad_rows": bad, "licenses": _licences(cfg)}

            return self._post_training_stage("sft", cfg, inputs, build, extra, resume)
        return self._done["sft"]

    def dpo(self, resume: bool = False, stop_after: int | None = None) -> Artifact | None:
        """Preference tuning of the SFT model (or `dpo.base`) against a reference whose log-probabilities
        are computed once and stored in the artifact (and reused on resume); None when stopped early."""
        if "dpo" not in self._done:
            cfg, inputs, files, extra = self._post_training_setup("dpo", resume)

            def build(out: Path) -> dict[str, Any]:
                model, tok = self._starting_model(cfg, inputs)
                pairs, bad = _read_rows(files, read_pair_file, out)
                if cfg.builtin:
                    pairs = stdlib_function_pairs(inputs["data"].path / "train.jsonl", cfg.builtin_pairs) + pairs
                template = ChatTemplate(eos_token=self.recipe.tokenizer.eos_token)
                tokenized = [(p, TokenizedPair(*tokenize_pair(tok, template, p))) for p in pairs]
                empty = sum(1 for _, t in tokenized if not t.prompt)
                train_pairs, held = split_held_out([(p, t) for p, t in tokenized if t.prompt], cfg.held_out_fraction)
                max_length = min(cfg.max_length or model.cfg.context, model.cfg.context)
                train_pairs, counts = truncate(train_pairs, max_length)
                held, _ = truncate(held, max_length)
                counts["dropped: empty prompt"] = empty
                pad_id = tok.token_to_id(self.recipe.tokenizer.pad_token)
                reference = model
                if cfg.reference:
                    reference, ref_tok = base_model(self.loaded.base_dir / cfg.reference, self.recipe.tokenizer)
                    if ref_tok.get_vocab() != tok.get_vocab():
                        raise RecipeError(f"dpo.reference: {cfg.reference}: its tokenizer differs from the policy's")
                cache, before_path = out / "reference_logps.safetensors", out / "held_out_before.json"
                cached = load_file(cache) if resume and cache.is_file() and before_path.is_file() else None
                if cached is not None and cached["chosen"].shape[0] == len(train_pairs):
                    ref = (cached["chosen"], cached["rejected"])
                    before = json.loads(before_path.read_text())
                else:  # both written under temporary names, then renamed: a resume never reads half a file
                    ref = reference_logps(reference, train_pairs, pad_id)
                    before = preference_accuracy(model, held, pad_id)
                    save_file({"chosen": ref[0], "rejected": ref[1]}, str(cache) + ".tmp")
                    before_path.with_suffix(".tmp").write_text(json.dumps(before) + "\n")
                    os.replace(str(cache) + ".tmp", cache)
                    os.replace(before_path.with_suffix(".tmp"), before_path)
                del reference
                metrics = train_dpo(model, train_pairs, ref, cfg, self.recipe.seed, pad_id, out,
                                    self.reporter.train_step, resume=resume, stop_after=stop_after)  # fmt: skip
                if metrics is None:
                    return None
                after = preference_accuracy(model, held, pad_id)
                save_model(model, out)
                tok.save(str(out / "tokenizer.json"))
                return {**metrics, "counts": counts, "bad_rows": bad, "held_out_before": before,
                        "held_out_after": after, "licenses": _licences(cfg)}  # fmt: skip

            return self._post_training_stage("dpo", cfg, inputs, build, extra, resume)
        return self._done["dpo"]

    def _post_training_stage(
        self,
        kind: str,
        cfg: SFTConfig | DPOConfig,
        inputs: dict[str, Artifact],
        build: Callable[[Path], dict[str, Any] | None],
        extra: dict[str, Any],
        resume: bool,
    ) -> Artifact | None:
        """Run (or find, or resume) an SFT or DPO stage; None when it stopped early."""
        config = {"seed": self.recipe.seed, **cfg.model_dump(mode="json", exclude=GUARD_SETTINGS)}
        art = self._stage(kind, config, inputs, build, extra=extra, keep_partial=resume, resume=resume)
        if art is not None:
            self._done[kind] = art
        return art

    def _post_training_setup(
        self, kind: str, resume: bool
    ) -> tuple[Any, dict[str, Artifact], list[Path], dict[str, Any]]:
        """The stage's config, input artifacts, data files and the digests that identify its other inputs."""
        cfg = getattr(self.recipe, kind)
        if cfg is None:
            raise RecipeError(f"the recipe has no [{kind}] section")
        inputs = self._post_training_inputs(cfg, resume)
        files, extra = post_training_sources(cfg, self.loaded.base_dir, self.recipe.tokenizer)
        return cfg, inputs, files, extra

    def _post_training_inputs(self, cfg: SFTConfig | DPOConfig, resume: bool) -> dict[str, Artifact]:
        """The artifacts a post-training stage reads: the corpus for built-in sets, and the model (with the
        recipe's tokenizer) it starts from when that is an earlier stage, not a folder; `resume` continues an
        interrupted earlier stage too (`clearlm dpo --resume` after a kill in pretraining)."""
        inputs: dict[str, Artifact] = {"data": self.data()} if cfg.builtin else {}
        if cfg.base == "pretrain":
            inputs["tokenizer"], inputs["pretrain"] = self.tokenizer(), self._require_train(resume)
        elif cfg.base == "sft":
            inputs["sft"] = self.sft(resume)  # holds the tokenizer it trained with
        return inputs

    def _starting_model(self, cfg: SFTConfig | DPOConfig, inputs: dict[str, Artifact]) -> tuple[Transformer, Tokenizer]:
        """Where post-training starts: an earlier stage's model (and the recipe's tokenizer), or a folder's."""
        if cfg.base in inputs:
            art = inputs[cfg.base]
            tok_dir = art.path if own_tokenizer(art.path) else inputs["tokenizer"].path
            return load_model(art.path), load_tokenizer(tok_dir)
        return base_model(self.loaded.base_dir / cfg.base, self.recipe.tokenizer)

    def outside_base(self) -> str | None:
        """The model folder the released model's post-training started from, when it was not trained here."""
        cfg = self.recipe.dpo or self.recipe.sft
        while cfg is not None and cfg.base != "pretrain":
            if cfg.base != "sft":
                return cfg.base
            cfg = self.recipe.sft
        return None

    def pretrains(self) -> bool:
        """Whether `run` trains the recipe's own model (so that every torchrun rank must take part)."""
        return self.outside_base() is None or any(
            c is not None and c.base == "pretrain" for c in (self.recipe.sft, self.recipe.dpo)
        )

    def _require_train(self, resume: bool) -> Artifact:
        art = self.train(resume=resume)
        if art is None:  # pragma: no cover - only stop_after returns None
            raise ArtifactError("training did not finish")
        return art

    def release(self, resume: bool = False) -> Artifact:
        if "release" not in self._done:
            outside = self.outside_base()
            inputs = {"data": self.data()}
            if outside is None:
                inputs.update(tokenizer=self.tokenizer(), shards=self.shards(), train=self._require_train(resume))
            inputs.update({k: getattr(self, k)(resume) for k in ("sft", "dpo") if getattr(self.recipe, k) is not None})
            inputs["eval"] = self.eval(resume)
            config = {"name": self.recipe.name, **self.recipe.release.model_dump(mode="json")}
            art = self._stage(
                "release",
                config,
                inputs,
                lambda out: build_release(self.recipe, self.loaded.text, inputs, out, self.loaded.base_dir, outside),
            )
            self._done["release"] = art
            self._link_release(art)
        return self._done["release"]

    def _link_release(self, art: Artifact) -> None:
        """`<workdir>/<recipe name>/release` always points at the latest release of that recipe."""
        link = self.workdir / self.recipe.name / "release"
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name("release.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(art.path, link.parent))
        os.replace(tmp, link)

    def run(self, until: str = "release", resume: bool = False) -> Artifact:
        if until not in STAGES:
            raise ValueError(f"unknown stage {until!r}")
        if until == "train":
            return self._require_train(resume)
        if until in ("sft", "dpo", "eval", "release"):
            return getattr(self, until)(resume)
        return getattr(self, until)()
