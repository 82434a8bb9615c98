"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 train like one process with the same global batch,
checkpoints move between world sizes, and what cannot run is a one-line error. Also torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_corpus, write_tiny_recipe
from safetensors import safe_open
from safetensors.torch import load_file

from clearlm.pipeline import Pipeline, Reporter
from clearlm.recipe import load_recipe

pytestmark = pytest.mark.slow
FSDP2 = 'train.distributed="fsdp2"'


def _clearlm(args: list[str], cwd: Path, processes: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launcher = launcher if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "clearlm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _train(cwd: Path, workdir: str, processes: int, *extra: str) -> subprocess.CompletedProcess[str]:
    result = _clearlm(["train", "tiny.toml", "--workdir", workdir, *extra], cwd, processes)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _run_dir(cwd: Path, workdir: str) -> Path:
    return next(p for p in (cwd / workdir / "artifacts").glob("train-*") if not p.name.endswith(".partial"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe (micro-batches of 4, 2 per step) and one single-process run of it."""
    cwd = tmp_path_factory.mktemp("distributed")
    write_tiny_recipe(cwd)
    _train(cwd, "one", 1)
    return cwd


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(folder):
    _train(folder, "ddp", 2)
    one, two = _run_dir(folder, "one"), _run_dir(folder, "ddp")
    assert one.name == two.name, "the number of processes is not part of the recipe or its digest"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    metrics = json.loads((two / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["tokens"] == json.loads((one / "manifest.json").read_text())[
        "metrics"]["tokens"]  # fmt: skip


def test_fsdp2_saved_on_two_processes_resumes_on_one_and_the_reverse(folder):
    reference = _losses(_run_dir(folder, "one"))
    _train(folder, "a", 2, "--set", FSDP2, "--stop-after", "4")
    resumed = _train(folder, "a", 1, "--set", FSDP2, "--resume")
    output = " ".join((resumed.stdout + resumed.stderr).split())
    assert "resuming from step-0000004" in output
    assert "applies under torchrun" in output, "one process says it is not sharding"
    assert _losses(_run_dir(folder, "a")) == pytest.approx(reference, rel=1e-5)
    _train(folder, "b", 1, "--set", FSDP2, "--stop-after", "5")
    _train(folder, "b", 2, "--set", FSDP2, "--resume")
    run = _run_dir(folder, "b")
    assert _losses(run) == pytest.approx(reference, rel=1e-5)
    last = run / "checkpoints" / "step-0000008"
    state = json.loads((last / "state.json").read_text())
    assert state["position"] == 8 * 8, "the data position counts global windows: 8 steps of 4 x 2"
    shards = sorted((last / "optimizer").iterdir())
    assert len(shards) == 2, "each process wrote its own optimizer shards"
    rows = safe_open(last / "model.safetensors", "pt").get_slice("embed_tokens.weight").get_shape()[0]
    halves = [safe_open(s, "pt").get_slice("embed_tokens.weight.exp_avg").get_shape()[0] for s in shards]
    assert halves == [rows // 2, rows // 2]
    assert {p.suffix for p in last.rglob("*") if p.is_file()} == {".safetensors", ".json"}, "nothing pickled"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.grad_accum_steps=3"], "must be a multiple of their number (2)"),
        ([], "`clearlm data` runs in one process; under torchrun only"),
    ],
)
def test_what_two_processes_cannot_run_is_a_one_line_error(folder, overrides, message):
    command = "data" if not overrides else "train"
    result = _clearlm([command, "tiny.toml", "--workdir", "bad", *[a for o in overrides for a in ("--set", o)]],
                      folder, 2)  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors and message in errors[0], result.stdout[-2000:] + result.stderr[-2000:]


class Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_compile_gives_the_same_losses_as_eager(folder):
    pipe = Pipeline(load_recipe(folder / "tiny.toml", ["train.compile=true"]), folder / "compiled", Notes())
    art = pipe.run("train")
    assert art.metrics["compiled"] is True and pipe.reporter.notes == []
    assert _losses(art.path) == pytest.approx(_losses(_run_dir(folder, "one")), rel=1e-4)


def test_compile_where_it_cannot_work_falls_back_with_a_message(folder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    pipe = Pipeline(load_recipe(folder / "tiny.toml", ["train.compile=true"]), folder / "fallback", Notes())
    art = pipe.run("train")
    assert art.metrics["compiled"] is False
    assert pipe.reporter.notes == [
        "train.compile: torch.compile does not work here (RuntimeError: no C++ compiler found); training without it"
    ]
    assert _losses(art.path) == _losses(_run_dir(folder, "one"))


def test_a_release_trained_on_two_processes_verifies_bit_for_bit_on_two(folder):
    """Pretraining and mid-training (both ingredients) on two processes, then verify on one and on two."""
    (folder / "mid").mkdir()
    write_corpus(folder / "mid", n_docs=24, seed=11)
    mid = ('\n[midtrain]\nseeds = [1, 2]\nmax_steps = 2\n[midtrain.data]\nvalidation_fraction = 0.2\n'
           'sources = [{ path = "mid/corpus.jsonl", license = "CC0-1.0" }]\n')  # fmt: skip
    (folder / "mid.toml").write_text((folder / "tiny.toml").read_text() + mid)
    run = _clearlm(["run", "mid.toml", "--workdir", "rel", "--set", FSDP2], folder, 2)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    release = folder / "rel" / "tiny" / "release"
    lineage = json.loads((release / "lineage.json").read_text())
    assert lineage["train"]["world_size"] == lineage["midtrain"]["world_size"] == 2
    one = _clearlm(["verify", str(release), "--base-dir", "."], folder, 1)
    said = " ".join((one.stdout + one.stderr).split())
    assert one.returncode == 3 and "train: differs at float-rounding level" in said, said[-2000:]
    assert "trained on 2 processes, re-run on 1" in said
    two = _clearlm(["verify", str(release), "--base-dir", "."], folder, 2)
    assert two.returncode == 0 and "reproduced bit-for-bit" in two.stdout + two.stderr, two.stderr[-2000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_muon_on_two_processes_stopped_and_resumed_equals_one_process(folder, strategy):
    muon = ['train.optimizer="muon"', 'model.architecture="olmo2"', f'train.distributed="{strategy}"']
    args = [a for o in muon for a in ("--set", o)]
    if not (folder / "muon-one").exists():
        _train(folder, "muon-one", 1, *args)
    _train(folder, f"muon-{strategy}", 2, *args, "--stop-after", "4")
    _train(folder, f"muon-{strategy}", 2, *args, "--resume")
    one, two = _losses(_run_dir(folder, "muon-one")), _losses(_run_dir(folder, f"muon-{strategy}"))
    assert two == pytest.approx(one, rel=1e-5) and one != _losses(_run_dir(folder, "one"))


_DEALT_OUT = """
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from clearlm.world import world
from clearlm.train.optim import _orthogonalised, _replicated_updates, _sharded_updates

w = world()
torch.manual_seed(0)
# 3 matrices of 5 rows: one rank orthogonalises a zero pad, and FSDP2 shards hold 3 and 2 rows;
# 1 row: the second rank's shard is empty
for shape, count in (((5, 3), 3), ((1, 4), 1)):
    mats = [torch.randn(shape) for _ in range(count)]
    expected = _orthogonalised(torch.stack(mats))
    mesh = init_device_mesh("cpu", (w.size,))
    sharded = _sharded_updates([distribute_tensor(m, mesh, [Shard(0)]) for m in mats])
    for e, s, r in zip(expected, sharded, _replicated_updates(mats, w), strict=True):
        torch.testing.assert_close(s.full_tensor(), e, rtol=0, atol=1e-5)
        torch.testing.assert_close(r, e, rtol=0, atol=1e-5)
print("dealt out and gathered back: equal", w.rank)
"""


def test_muon_newton_schulz_dealt_out_over_ranks_equals_one_process(tmp_path):
    script = tmp_path / "dealt.py"
    script.write_text(_DEALT_OUT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(launcher, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("equal") == 2
