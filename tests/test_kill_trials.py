"""kill -9 inside each stage, then `clearlm run --resume`: nothing that looks finished is incomplete, a stage
with a checkpoint resumes from it, and every stage ends with the uninterrupted run's bytes
(`benchmarks/kill_trials.py` with fewer trials; the benchmark runs 50 on the quickstart)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from conftest import write_all_stages_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kill_trials import Run, command, stage_outputs, trial

pytestmark = pytest.mark.slow


def test_runs_killed_inside_each_stage_resume_to_the_uninterrupted_runs_bytes(tmp_path):
    recipe = str(write_all_stages_recipe(tmp_path))
    reference = Run(command(recipe, [], tmp_path / "reference"))
    assert reference.finish() == 0, reference.lines[-5:]
    outputs, windows = stage_outputs(tmp_path / "reference"), reference.windows()
    assert set(windows) == {"data", "tokenizer", "shards", "train", "sft", "dpo", "eval", "release"}
    rng = random.Random(0)
    resumed = 0
    for stage in ("data", "train", "sft", "dpo", "release"):
        start, end = windows[stage]
        record = trial(recipe, [], tmp_path / "trial", rng.uniform(start, end), outputs)
        assert not record["problems"], record
        resumed += len(record["checkpoints"])
    assert resumed, "no trial was killed while a training stage had a checkpoint"
