"""Two runs at once on one work directory: one process builds each artifact while the other waits, naming the
process it waits for; a lock left by a killed process is taken over; nothing is built twice or corrupted."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import write_tiny_recipe
from kill_trials import Run, command, incomplete_artifacts

from clearlm.artifacts import ArtifactStore

pytestmark = pytest.mark.slow


def _digests(workdir: Path) -> dict[str, str]:
    return {json.loads(m.read_text())["kind"]: json.loads(m.read_text())["digest"]
            for m in (workdir / "artifacts").glob("*/manifest.json")}  # fmt: skip


def test_a_run_waits_for_the_process_building_an_artifact_and_takes_over_a_dead_ones(tmp_path):
    recipe = str(write_tiny_recipe(tmp_path))
    assert Run(command(recipe, [], tmp_path / "first")).finish() == 0
    digests = _digests(tmp_path / "first")
    store = ArtifactStore(tmp_path / "second" / "artifacts")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # this test process builds the data artifact, as far as the run can tell
        with store.building("data", digests["data"], lambda _: None):
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    run = Run(command(recipe, [], tmp_path / "second"))
    assert run.wait_for(f"data: waiting for process {os.getpid()} (")
    assert not list(store.root.glob("data-*")) and run.proc.poll() is None, "nothing written while it waits"
    release.set()
    holder.join()
    assert run.finish() == 0
    assert any(line == "data: building" for _, line in run.lines), "built by the run once the lock was free"

    # a process killed while building leaves its record in the lock file (the kernel frees the lock itself)
    lock = store.root / ".locks" / f"tokenizer-{digests['tokenizer'].removeprefix('sha256:')[:16]}.lock"
    lock.write_text(json.dumps({"pid": 999999, "command": "clearlm run tiny.toml"}))
    (store.root / f"tokenizer-{digests['tokenizer'].removeprefix('sha256:')[:16]}").rename(store.root / "gone")
    again = Run(command(recipe, [], tmp_path / "second"))
    assert again.finish() == 0
    said = " ".join(" ".join(line for _, line in again.lines).split())
    assert "tokenizer: process 999999 (clearlm run tiny.toml) stopped while building it (killed?); taking over" in said
    assert lock.read_text() == "", "a finished build leaves no holder behind"


def test_two_runs_at_once_build_each_shared_artifact_once_and_corrupt_nothing(tmp_path):
    recipe = str(write_tiny_recipe(tmp_path))
    workdir = tmp_path / "runs"
    runs = [Run(command(recipe, [], workdir)), Run(command(recipe, [], workdir)),
            Run(command(recipe, ["train.max_steps=6"], workdir))]  # fmt: skip
    assert [run.finish() for run in runs] == [0, 0, 0], [run.lines[-3:] for run in runs]
    built = [line.split(":")[0] for run in runs for _, line in run.lines if line.endswith(": building")]
    once, twice = ["data", "tokenizer", "shards"], ["train", "eval", "release"]  # the third run trains for 6 steps
    assert sorted(built) == sorted(once + twice * 2), built
    assert incomplete_artifacts(workdir) == []
    assert not list((workdir / "artifacts").glob("*.partial"))
