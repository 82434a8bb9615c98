"""A full disk inside each stage (a size-limited tmpfs holding the earlier stages' artifacts, filled half way
into the stage's own): one error naming the path and the space, the earlier artifacts intact, nothing
half-written that looks complete, and once space is freed `--resume` continues to the uninterrupted run's
bytes. In one process here, stage by stage; `benchmarks/disk_full_trials.py` runs the commands themselves at
random fill levels. Needs the right to mount a tmpfs (root on Linux); skipped where that is refused."""

from __future__ import annotations

import gc
import shutil

import pytest
from conftest import write_all_stages_recipe
from disk_full_trials import ROOM, can_mount, empty, fill_level, limit, small_disk, stage_space
from kill_trials import checkpoints_left, incomplete_artifacts

from clearlm.errors import DiskFullError
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe
from clearlm.release.compare import first_difference, stage_outputs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs is not permitted")]


def _build(pipe: Pipeline, stage: str, resume: bool = False) -> None:
    if stage in ("data", "tokenizer", "shards"):
        pipe.run(stage)
    else:
        pipe.run(stage, resume=resume)


def test_a_full_disk_inside_each_stage_is_one_line_and_resumes_to_the_uninterrupted_runs_bytes(tmp_path):
    small = ["model.d_model=32", "model.context=64", "train.micro_batch_size=4", "sft.micro_batch_size=8"]
    recipe = load_recipe(write_all_stages_recipe(tmp_path), small)
    order = Pipeline(recipe, tmp_path / "reference").stages()
    Pipeline(recipe, tmp_path / "reference").run("release")
    reference, space = stage_outputs(tmp_path / "reference"), stage_space(tmp_path / "reference")
    made = {d.name.rsplit("-", 1)[0]: d for d in (tmp_path / "reference" / "artifacts").iterdir() if d.is_dir()}
    with small_disk(tmp_path / "disk") as disk:
        work = disk / "work"
        for stage in order:
            gc.collect()  # the last trial's memory maps of files on the disk go, or their pages stay allocated
            empty(disk)
            earlier = order[: order.index(stage)]
            for kind in earlier:
                shutil.copytree(made[kind], work / "artifacts" / made[kind].name, symlinks=True)
            limit(disk, fill_level(space, stage, 0.5))
            with pytest.raises(DiskFullError) as err:
                _build(Pipeline(recipe, work), stage)
            message = str(err.value)
            del err  # its traceback holds the failed stage's open files
            assert "\n" not in message and message.startswith(str(work / "artifacts" / stage)), message
            assert "no space left on the device" in message or "is free there" in message, message
            assert incomplete_artifacts(work) == [], stage
            assert first_difference({s: reference[s] for s in earlier}, stage_outputs(work)) is None, stage
            left = checkpoints_left(work)
            limit(disk, ROOM)
            notes: list[str] = []
            pipe = Pipeline(recipe, work)
            pipe.reporter.note = notes.append  # type: ignore[method-assign]
            _build(pipe, stage, resume=True)
            for kind, ckpt in left.items():
                assert f"{kind}: resuming from {ckpt}" in notes, (stage, notes)
            assert incomplete_artifacts(work) == [], stage
            built = {s: reference[s] for s in order[: order.index(stage) + 1]}
            assert first_difference(built, stage_outputs(work)) is None, stage
