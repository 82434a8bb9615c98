"""kill -9 inside each stage (in a training stage, once it has a checkpoint), then `clearlm run --resume`:
nothing that looks finished is incomplete, a stage with a checkpoint resumes from it, and every stage ends
with the uninterrupted run's bytes (`benchmarks/kill_trials.py` with one trial a stage, the stages before it
copied from the uninterrupted run; the benchmark runs 50 at random moments on the quickstart, from scratch)."""

from __future__ import annotations

import pytest
from conftest import write_all_stages_recipe
from kill_trials import CHECKPOINTED, Run, command, trial

from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe
from clearlm.release.compare import stage_outputs

pytestmark = pytest.mark.slow


def test_runs_killed_inside_each_stage_resume_to_the_uninterrupted_runs_bytes(tmp_path):
    recipe = str(write_all_stages_recipe(tmp_path))
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # the matmul peak measured once, in the reference run
    reference = Run(command(recipe, [], tmp_path / "reference"), env)
    assert reference.finish() == 0, reference.lines[-5:]
    outputs = stage_outputs(tmp_path / "reference")
    order = Pipeline(load_recipe(recipe), tmp_path).stages()
    assert set(outputs) == set(order)
    # mid-training's data and shards stages run the data and shards stages' code on another mix: not killed again
    # (their outputs are still compared after every resume)
    for stage in [s for s in order if s not in ("mid_data", "mid_shards")]:
        record = trial(recipe, [], tmp_path / "trial", stage, 0.0, outputs, env,
                       after_checkpoint=stage in CHECKPOINTED, earlier_from=tmp_path / "reference")  # fmt: skip
        assert record["hit"] == stage and not record["problems"], record
        assert (stage in record["checkpoints"]) == (stage in CHECKPOINTED), record
