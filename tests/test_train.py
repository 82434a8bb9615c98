import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.pipeline import Pipeline, Reporter
from clearlm.recipe import TrainConfig, load_recipe
from clearlm.train.loop import accumulate_gradients
from clearlm.train.optim import lr_at


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def _losses(train_dir):
    return [r["loss"] for r in map(json.loads, (train_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


class StepRecorder(Reporter):
    def __init__(self):
        self.steps, self.notes = [], []

    def train_step(self, record):
        self.steps.append(record["step"])

    def note(self, message):
        self.notes.append(message)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [4, 5])
def test_resume_is_bit_identical(tmp_path, tiny_recipe, stop):
    straight = Pipeline(load_recipe(tiny_recipe), tmp_path / "a").train()
    interrupted = Pipeline(load_recipe(tiny_recipe), tmp_path / "b")
    assert interrupted.train(stop_after=stop) is None
    partial_log = (interrupted.store.partial_path("train", straight.digest) / "log.jsonl").read_text()
    rec = StepRecorder()
    resumed = Pipeline(load_recipe(tiny_recipe), tmp_path / "b", rec).train(resume=True)
    assert rec.steps == list(range(stop + 1, 9)), "resume must continue, not start over"
    assert rec.notes == [f"train: resuming from step-{stop:07d}"]
    assert (resumed.path / "log.jsonl").read_text().startswith(partial_log), "the first part of the log is kept"
    assert resumed.digest == straight.digest
    assert _losses(resumed.path) == _losses(straight.path)
    assert len(_losses(straight.path)) == 8
    a, b = load_file(straight.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(straight.manifest["outputs"]) == set(resumed.manifest["outputs"]), "same checkpoints, same files"


@pytest.mark.slow
def test_without_resume_a_partial_run_starts_over(tmp_path, tiny_recipe):
    pipe = Pipeline(load_recipe(tiny_recipe), tmp_path / "c")
    assert pipe.train(stop_after=4) is None
    rec = StepRecorder()
    Pipeline(load_recipe(tiny_recipe), tmp_path / "c", rec).train()
    assert rec.steps == list(range(9))
    assert rec.notes == ["train: discarding an interrupted run at step-0000004 (pass --resume to continue it)"]


def test_accumulated_gradients_weigh_micro_batches_by_tokens():
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, context=8)
    torch.manual_seed(0)
    batch = torch.randint(0, 50, (4, 9))
    grads = []
    for micro in ([batch], [batch[:1], batch[1:]]):  # unequal micro-batches: 1 row and 3 rows
        model = Transformer(cfg)
        model.init_weights(0)
        loss = accumulate_gradients(model, micro)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_training_log_and_checkpoints(tiny_run):
    art = tiny_run.artifacts["train"]
    records = [json.loads(line) for line in (art.path / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_loss" in records[0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens", "mfu"} <= records[1].keys()
    assert sorted(p.name for p in (art.path / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert not (art.path / "checkpoints" / "step-0000004" / "optimizer.safetensors").exists()
    assert (art.path / "checkpoints" / "step-0000008" / "optimizer.safetensors").exists()
    assert art.metrics["val_loss"] < art.metrics["initial_val_loss"]
