"""The stage graph behind `clearlm run`, walked over the stage table (`clearlm.stages`).

Each stage is looked up by its digest first; only missing or outdated artifacts are built. A digest hashes the
stage's settings, its outside inputs and its input artifacts' digests, so it is known before anything runs:
`plan` says what a run would build, resume or find, and why.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearlm.artifacts import Artifact, ArtifactStore, compute_digest
from clearlm.errors import ArtifactError, DiskFullError
from clearlm.numerics import begin_stage, cnr_not_in_effect, keep_freed_memory, stage_threads
from clearlm.recipe import LoadedRecipe
from clearlm.stages import Reporter, StageRun, StageSpec, resolve, spec
from clearlm.storage import bytes_under, disk_full, failed_path, free_bytes, human
from clearlm.train.checkpoint_files import resumable, shown
from clearlm.world import barrier, world

__all__ = ["Pipeline", "PlanEntry", "Reporter"]


@dataclass(frozen=True)
class PlanEntry:
    """What `run` would do with one stage: "cached" (found), "resume" (from a checkpoint) or "build", and why."""

    stage: str
    label: str
    action: str
    why: str
    digest: str


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
        self.world = world()
        self._done: dict[str, Artifact] = {}
        self._digests: dict[str, str] = {}
        self._made_from: dict[str, tuple[Any, Any]] = {}
        self._warned = False

    @property
    def artifacts(self) -> dict[str, Artifact]:
        """The artifacts built or found so far, in stage order."""
        return dict(self._done)

    def stages(self, target: str = "release") -> list[str]:
        """The stages that building `target` runs, in order."""
        return resolve(self.recipe, [target])

    def digest(self, name: str) -> str:
        """A stage's digest, from its settings, its outside inputs and its inputs' digests: nothing is built."""
        if name not in self._digests:
            inputs = {up: self.digest(up) for up in spec(name).needs(self.recipe)}
            config, identity = self.made_from(name)
            self._digests[name] = compute_digest(name, config, inputs, identity)
        return self._digests[name]

    def made_from(self, name: str) -> tuple[Any, Any]:
        """(settings, digests of the outside files) of a stage, worked out once: an identity hashes whole files."""
        if name not in self._made_from:
            stage = spec(name)
            self._made_from[name] = (stage.config(self.loaded), stage.identity(self.loaded) if stage.identity else None)
        return self._made_from[name]

    def run(self, target: str = "release", resume: bool = False, stop_after: int | None = None) -> Artifact | None:
        """Build `target` and what it needs. `resume` continues interrupted stages from their checkpoints;
        `stop_after` stops the target itself after that many steps (None is returned). Under torchrun the ranks
        other than 0 only take part in the stages that run on every rank, and return None."""
        if not self.world.main:
            self._follow(target, resume, stop_after)
            return None
        return self.build(target, resume, stop_after)

    def build(self, name: str, resume: bool = False, stop_after: int | None = None) -> Artifact | None:
        """Find or build one stage, after what it needs; None when stopped early."""
        if name in self._done:
            return self._done[name]
        stage = spec(name)
        inputs: dict[str, Artifact] = {}
        for up in stage.needs(self.recipe):
            art = self.build(up, resume)
            if art is None:
                return None
            inputs[up] = art
        run = StageRun(self.loaded, inputs, self.reporter, self.world, resume, stop_after)
        if stage.distributed:
            barrier(self.world)  # the inputs are built: the other ranks may read them
        art = self._stage(stage, run)
        if stage.distributed:
            barrier(self.world)  # the artifact is finished (or the run stopped): the other ranks may look it up
        if art is not None:
            self._done[name] = art
            if name == "release":
                self._link_release(art)
        return art

    def _follow(self, name: str, resume: bool, stop_after: int | None = None) -> None:
        """On a torchrun rank other than 0: walk the graph as rank 0 does, taking part in the stages that run on
        every rank (rank 0 builds the rest, and they are found once it says so)."""
        if name in self._done:
            return
        stage = spec(name)
        for up in stage.needs(self.recipe):
            self._follow(up, resume)
        if not stage.distributed:
            return
        w = self.world
        barrier(w)  # rank 0 has built the inputs
        inputs = {up: self.store.lookup(up, self.digest(up)) for up in stage.needs(self.recipe)}
        missing = [up for up, art in inputs.items() if art is None]
        if missing:
            raise ArtifactError(f"rank {w.rank}: {', '.join(missing)} not found after rank 0 built it; the work "
                                "directory must be shared by every rank")  # fmt: skip
        digest = self.digest(name)
        if self.store.lookup(name, digest) is None:
            barrier(w)  # rank 0 has made the working folder
            self._begin(name, w.size)
            run = StageRun(self.loaded, inputs, self.reporter, w, resume, stop_after)  # type: ignore[arg-type]
            stage.load()(run, self.store.partial_path(name, digest))
        barrier(w)  # rank 0 has finished the artifact
        if (art := self.store.lookup(name, digest)) is not None:
            self._done[name] = art

    def _stage(self, stage: StageSpec, run: StageRun) -> Artifact | None:
        """Find the stage's artifact, or build it holding its lock (another run may be building it: then wait
        and find it)."""
        name, digest = stage.name, self.digest(stage.name)
        found = self.store.lookup(name, digest)
        if found is None:
            with self.store.building(name, digest, self.reporter.note):
                found = self.store.lookup(name, digest)
                if found is None:
                    if stage.resumes == "checkpoints":
                        self._announce_resume(stage, digest, run.resume)
                    return self._build(stage, digest, run)
        self.reporter.stage_skipped(name, found)
        return found

    def _build(self, stage: StageSpec, digest: str, run: StageRun) -> Artifact | None:
        name, w = stage.name, self.world
        for art in run.inputs.values():  # a flipped bit in an input stops the stage before it reads the file
            self.store.require_intact(art)
        build = stage.load()
        self.reporter.stage_started(name)
        started = time.perf_counter()
        keep = stage.resumes == "parts" or (stage.resumes == "checkpoints" and run.resume)
        work = self.store.start(name, digest, keep_partial=keep)
        numerics = self._begin(name, w.size if stage.distributed else 1)
        try:
            if stage.distributed:
                barrier(w)  # the other ranks wait until the working folder exists
            metrics = build(run, work)
            if metrics is None:
                return None
            seconds = time.perf_counter() - started
            config, sources = self.made_from(name)
            art = self.store.finish(name, digest, config, run.inputs, metrics, seconds, sources=sources,
                                    numerics=numerics)  # fmt: skip
        except BaseException as err:
            full = disk_full(err)
            written = bytes_under(work) if full else 0
            if not stage.resumes:  # a failed stage leaves nothing half-written; data and training keep their work
                shutil.rmtree(work, ignore_errors=True)
            if full:
                raise self._disk_full(stage, full, work, written) from None
            raise
        self.reporter.stage_finished(name, art)
        return art

    def _begin(self, name: str, processes: int) -> dict[str, Any] | None:
        """Set the process state the stage's numbers depend on, whatever ran before it (see `numerics`), and
        the allocator options training wants, for every stage that computes with torch."""
        if not spec(name).torch:
            return None
        keep_freed_memory()
        info = begin_stage(self.threads.get(name) or stage_threads(self.recipe.train.threads, processes))
        if (warning := cnr_not_in_effect(info)) and not self._warned:
            self.reporter.note(warning)
            self._warned = True
        return info

    @staticmethod
    def _disk_full(stage: StageSpec, err: Exception, work: Path, written: int) -> DiskFullError:
        """One line: where, how much is free (or, for a write that checked first, how much it needs), and what to
        do so that nothing kept is thrown away."""
        if stage.resumes == "checkpoints":
            then = ("run again with --resume to continue from its last checkpoint"
                    if resumable(work, stage.resume_from) else "run again")  # fmt: skip
        else:
            then = "run again: its finished parts are kept" if stage.resumes else "run again"
        if isinstance(err, DiskFullError):
            return DiskFullError(f"{err}; once space is freed, {then}")
        where, free = failed_path(err, work), human(free_bytes(work))
        return DiskFullError(f"{where}: no space left on the device ({free} free) while building {stage.name}, "
                             f"after writing {human(written)}; once space is freed, {then}")  # fmt: skip

    def _announce_resume(self, stage: StageSpec, digest: str, resume: bool) -> None:
        name, partial = stage.name, self.store.partial_path(stage.name, digest)
        found = resumable(partial, stage.resume_from)
        if found and resume:
            self.reporter.note(f"{name}: resuming from {shown(partial, found)}")
        elif found:
            self.reporter.note(f"{name}: discarding an interrupted run at {shown(partial, found)} (pass --resume to "
                               "continue it)")  # fmt: skip
        elif resume:
            self.reporter.note(f"{name}: nothing to resume, starting from step 0")

    def _link_release(self, art: Artifact) -> None:
        """`<workdir>/<recipe name>/release` always points at the latest release of that recipe."""
        link = self.workdir / self.recipe.name / "release"
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name("release.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(art.path, link.parent))
        os.replace(tmp, link)

    def require(self, name: str, resume: bool = False) -> Artifact:
        """A stage's artifact, built if needed (never stopped early)."""
        art = self.run(name, resume)
        if art is None:  # pragma: no cover - only stop_after or a torchrun worker returns None
            raise ArtifactError(f"{name} did not finish")
        return art

    def plan(self, target: str = "release", resume: bool = False) -> list[PlanEntry]:
        """What `run` would do with each stage, without running anything."""
        from clearlm.plan import explain

        entries = []
        for name in self.stages(target):
            digest = self.digest(name)
            stage = spec(name)
            if self.store.lookup(name, digest) is not None:
                action, why = "cached", "found with the same settings and inputs"
            else:
                partial = self.store.partial_path(name, digest)
                found = resumable(partial, stage.resume_from) if stage.resumes == "checkpoints" else None
                action = "resume" if found and resume else "build"
                why = f"from {shown(partial, found)}" if action == "resume" else explain(self, name)
            entries.append(PlanEntry(name, stage.label, action, why, digest))
        return entries
