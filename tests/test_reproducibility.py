"""Bit for bit whatever the process did before: every stage's outputs are the same bytes when it runs fresh,
after other stages in one process, after an interrupted and resumed stage, with a cold or a warm cache, after
a library changed the thread count and the global RNG, and beside a busy process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_all_stages_recipe

from clearlm.artifacts import sha256_file
from clearlm.numerics import available_cpus, begin_stage, numerics, stage_threads
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe
from clearlm.release.compare import first_difference, stage_outputs
from clearlm.release.verify import verify_release
from clearlm.train.perf import measure_matmul_peak

# One process follows a plan: optional "disturb" (what a library or an earlier job may leave: one thread, a
# drawn-from global RNG, MKL already warmed up), then stage calls, `name:stop=N` stopping one after step N
# and `name:resume` continuing it.
DRIVER = """
import json, sys
from pathlib import Path
import torch
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe

recipe, workdir, plan = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
pipe = Pipeline(load_recipe(recipe), workdir)
for action in plan:
    if action == "disturb":
        torch.set_num_threads(1)
        torch.manual_seed(123)
        torch.randn(1000, 1000) @ torch.randn(1000, 1000)
        continue
    stage, _, option = action.partition(":")
    if option.startswith("stop="):
        assert pipe.run(stage, stop_after=int(option[5:])) is None, action
    else:
        assert pipe.run(stage, resume=option == "resume") is not None, action
"""


def _run(recipe: Path, workdir: Path, plan: list[str], cache: Path, busy: bool = False) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if busy else 0)]
    try:
        subprocess.run([sys.executable, "-c", DRIVER, str(recipe), str(workdir), json.dumps(plan)],
                       env=env, check=True, cwd=recipe.parent)  # fmt: skip
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def _environments(workdir: Path, stage: str) -> list[dict]:
    """What a stage's artifacts recorded of the process that made them (threads, MKL's mode and code path): the
    first thing to compare when two runs part."""
    manifests = sorted((workdir / "artifacts").glob(f"{stage}-*[!l]/manifest.json"))
    return [json.loads(m.read_text()).get("environment", {}) for m in manifests]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, folder): every stage run in one process with a cold cache (the matmul peak measured), in
    `folder / "together"`, and the cache that run left in `folder / "warm-cache"`."""
    folder = tmp_path_factory.mktemp("repro")
    recipe = write_all_stages_recipe(folder)
    _run(recipe, folder / "together", ["release"], folder / "warm-cache")
    assert (folder / "warm-cache" / "clearlm" / "matmul_peak.json").is_file()
    return recipe, folder


@pytest.mark.slow
def test_every_stage_gives_the_same_bytes_whatever_ran_before_it_in_the_process(reference, tmp_path):
    recipe, folder = reference
    warm = folder / "warm-cache"
    # each alone in a process that was disturbed first
    for stage in ("train", "midtrain", "sft", "dpo", "rlvr", "release"):
        _run(recipe, tmp_path / "fresh", ["disturb", stage], warm)
    stops = ["train:stop=3", "train:resume", "midtrain:stop=4", "midtrain:resume", "sft:stop=2", "sft:resume",
             "dpo:stop=2", "dpo:resume", "rlvr:stop=2", "rlvr:resume", "release"]  # fmt: skip
    _run(recipe, tmp_path / "resumed", stops, warm)
    _run(recipe, tmp_path / "loaded", ["release"], warm, busy=True)

    together = stage_outputs(folder / "together")
    assert set(together) == set(Pipeline(load_recipe(recipe), folder).stages())
    for history in ("fresh", "resumed", "loaded"):
        difference = first_difference(together, stage_outputs(tmp_path / history))
        stage = (difference or "").split(":")[0].split(" ")[0]
        assert difference is None, (f"{history}: {difference}; what each recorded of its process: "
                                    f"{_environments(folder / 'together', stage)} against "
                                    f"{_environments(tmp_path / history, stage)}")  # fmt: skip
    manifest = json.loads(next((tmp_path / "fresh" / "artifacts").glob("sft-*[!l]/manifest.json")).read_text())
    assert manifest["environment"]["threads"] == stage_threads(0), "the stage set its threads itself"
    assert manifest["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if available_cpus() > 1:
        assert manifest["environment"]["threads"] != 1, "not the count the disturbance left"


def _edited(release: Path, to: Path, rel: str, edit) -> Path:
    """A copy of the release with one file edited and its manifest digest updated (only the claim changes)."""
    shutil.copytree(release, to)
    (to / rel).write_text(edit((to / rel).read_text()))
    manifest = json.loads((to / "manifest.json").read_text())
    manifest["outputs"][rel] = sha256_file(to / rel)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


@pytest.mark.slow
@pytest.mark.skipif("mkl_cbwr" not in numerics(), reason="the rounding case changes MKL's mode; this torch has no MKL")
def test_verify_tells_a_float_rounding_difference_from_a_real_one(reference, tmp_path):
    folder = reference[1]
    release = folder / "together" / "tiny" / "release"
    # MKL outside its strict reproducible mode: its sums are split another way, the last bits change (on the
    # x86-64 CPUs this was tried on; a CPU where both modes agree would make this case reproduce exactly)
    env = {**os.environ, "MKL_CBWR": "AUTO", "XDG_CACHE_HOME": str(folder / "warm-cache")}
    rounding = subprocess.run([sys.executable, "-m", "clearlm", "verify", str(release), "--base-dir", str(folder),
                               "--workdir", str(tmp_path)], env=env, capture_output=True, text=True)  # fmt: skip
    out = " ".join(rounding.stderr.split())
    assert rounding.returncode == 3, out
    assert "train: differs at float-rounding level (max |Δ|" in out and "first at step" in out
    assert "likely cause: mkl_cbwr AUTO,STRICT (release) vs AUTO (here)" in out
    assert "reproduced only to float rounding: first difference at train" in out

    def warmup(text: str) -> str:
        return text.replace("warmup_steps = 2\n", "warmup_steps = 3\n", 1)

    real = verify_release(_edited(release, tmp_path / "warmup", "recipe.toml", warmup), folder, tmp_path)
    assert real.stage == "train" and not real.rounding and not real.reproduced, real.lines
    assert real.lines[-2].startswith("train: differs (max |Δ|") and "first at step 1;" in real.lines[-2]


def test_measuring_the_matmul_peak_leaves_the_rng_and_the_threads_as_they_were():
    torch.manual_seed(5)
    threads = torch.get_num_threads()
    before = torch.get_rng_state()
    measure_matmul_peak(1, n=64, repeats=1)
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads


def test_a_stage_sets_its_thread_count_whatever_was_set_before():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert begin_stage(2)["threads"] == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    info = numerics()
    if "mkl_cbwr" in info:  # x86-64 builds of torch carry MKL; importing clearlm asked for its CNR mode
        assert info["mkl_cbwr"] == "AUTO,STRICT"
