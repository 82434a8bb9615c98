import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from clearlm.pipeline import Pipeline
from clearlm.recipe import TrainConfig, load_recipe
from clearlm.train.optim import lr_at


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def _losses(train_dir):
    return [r["loss"] for r in map(json.loads, (train_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, tiny_recipe):
    straight = Pipeline(load_recipe(tiny_recipe), tmp_path / "a").train()
    interrupted = Pipeline(load_recipe(tiny_recipe), tmp_path / "b")
    assert interrupted.train(stop_after=4) is None
    resumed = Pipeline(load_recipe(tiny_recipe), tmp_path / "b").train(resume=True)
    assert resumed.digest == straight.digest
    assert _losses(resumed.path) == _losses(straight.path)
    assert len(_losses(straight.path)) == 8
    a, b = load_file(straight.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_without_resume_a_partial_run_starts_over(tmp_path, tiny_recipe):
    pipe = Pipeline(load_recipe(tiny_recipe), tmp_path / "c")
    assert pipe.train(stop_after=4) is None
    art = Pipeline(load_recipe(tiny_recipe), tmp_path / "c").train()
    steps = [r["step"] for r in map(json.loads, (art.path / "log.jsonl").read_text().splitlines())]
    assert steps == list(range(9))


@pytest.mark.slow
def test_gradient_accumulation_weights_tokens_like_one_big_batch(tmp_path, tiny_recipe):
    big = Pipeline(load_recipe(tiny_recipe, ["train.micro_batch_size=8", "train.grad_accum_steps=1"]), tmp_path / "d")
    small = Pipeline(load_recipe(tiny_recipe, ["train.micro_batch_size=2", "train.grad_accum_steps=4"]), tmp_path / "e")
    a, b = _losses(big.train().path), _losses(small.train().path)
    assert a == pytest.approx(b, rel=1e-4)


def test_training_log_and_checkpoints(tiny_run):
    art = tiny_run.artifacts["train"]
    records = [json.loads(line) for line in (art.path / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_loss" in records[0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens", "mfu"} <= records[1].keys()
    assert sorted(p.name for p in (art.path / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert not (art.path / "checkpoints" / "step-0000004" / "optimizer.safetensors").exists()
    assert (art.path / "checkpoints" / "step-0000008" / "optimizer.safetensors").exists()
    assert art.metrics["val_loss"] < art.metrics["initial_val_loss"]
