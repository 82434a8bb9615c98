"""Numerical faults stop training at the bad step, before it changes the weights, naming the step, the batch and
the likely cause, with the last good checkpoint kept and resumable."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_decoder, write_tiny_recipe
from safetensors.torch import load_file

from clearlm.errors import TrainingError
from clearlm.pipeline import Pipeline
from clearlm.recipe import SFTConfig, load_recipe
from clearlm.train.checkpoint_files import latest_checkpoint
from clearlm.train.guard import LossGuard
from clearlm.train.posttrain import run_steps


def _guard(tmp_path: Path, losses: list[float], norms: list[float] | None = None, factor: float = 3.0) -> LossGuard:
    norms = norms or [1.0] * len(losses)
    records = [{"step": i + 1, "loss": x, "grad_norm": g} for i, (x, g) in enumerate(zip(losses, norms, strict=True))]
    return LossGuard(factor, "train", records, tmp_path)


def _stop(guard: LossGuard, loss: float, grad_norm: float = 1.0) -> str:
    with pytest.raises(TrainingError) as err:
        guard.check(len(guard.history) + 1, loss, grad_norm, 1e-3, lambda: "windows 0-7")
    return str(err.value)


def test_nan_at_the_first_step_blames_the_start_not_the_learning_rate(tmp_path: Path) -> None:
    message = _stop(_guard(tmp_path, []), math.nan, math.nan)
    assert "train step 1: the loss is nan" in message
    assert "batch: windows 0-7" in message and "initial weights" in message
    assert "no checkpoint was written" in message


def test_infinite_gradient_with_a_finite_loss_stops(tmp_path: Path) -> None:
    message = _stop(_guard(tmp_path, [4.0] * 6), 4.0, math.inf)
    assert "the gradient norm is inf" in message and "the gradients overflowed" in message


def test_spike_with_a_steady_gradient_points_at_the_batch(tmp_path: Path) -> None:
    guard = _guard(tmp_path, [5.0, 4.5, 4.2, 4.0, 3.9, 3.8])
    guard.check(7, 3.7, 1.0, 1e-3, lambda: "unused")  # an ordinary step passes and joins the history
    message = _stop(guard, 13.0)
    assert "train step 8" in message and "3.2 times the median 4 of the 7 steps before" in message
    assert "this batch rather than divergence" in message and "train.spike_factor" in message


def test_spike_after_a_rising_gradient_norm_is_divergence(tmp_path: Path) -> None:
    message = _stop(_guard(tmp_path, [4.0] * 8, [1.0] * 6 + [2.0, 9.0]), 14.0, 30.0)
    assert "divergence: the gradient norm rose from 1 to 30" in message and "lower train.lr" in message


@pytest.mark.parametrize(
    ("history", "loss", "factor"),
    [
        ([0.02] * 10, 0.09, 3.0),  # near-zero losses wobble by large factors: a rise under one nat is not a spike
        ([9.0, 8.0, 7.0, 6.0], 30.0, 3.0),  # too few steps to judge
        ([2.0] * 10, 9.0, 0.0),  # factor 0: only non-finite values stop
        ([2.0] * 10, 5.9, 3.0),  # under the factor
        ([0.0] * 10, 0.5, 3.0),  # a loss that underflowed to zero: no ratio to take
    ],
)
def test_no_stop(tmp_path: Path, history: list[float], loss: float, factor: float) -> None:
    guard = _guard(tmp_path, history, factor=factor)
    guard.check(len(history) + 1, loss, 1.0, 1e-3, lambda: "unused")
    assert guard.history[-1] == (loss, 1.0)


def test_pretraining_stops_before_the_bad_step_and_resumes_when_allowed(tmp_path: Path) -> None:
    """A learning rate of 30 without clipping diverges within a few steps (step 6 here); the run stops at the bad
    step with the last checkpoint before it kept and finite. The guard's setting is not part of the stage's
    identity: raised, --resume continues the same run from that checkpoint."""
    recipe = write_tiny_recipe(tmp_path, steps=12)
    overrides = ["train.lr=30", "train.grad_clip=0", "train.warmup_steps=0"]
    with pytest.raises(TrainingError) as err:
        Pipeline(load_recipe(recipe, overrides), tmp_path / "runs").run("train")
    message = str(err.value)
    found = re.match(r"training stopped at train step (\d+): the (loss|gradient norm)", message)
    assert found, message
    step = int(found.group(1))
    assert 5 <= step <= 12, message  # after the step 4 checkpoint (step 6 on the machines this was written on)
    first = (step - 1) * 8  # 8 windows a step
    assert f"training windows {first}-{first + 7} of the shuffled stream, " in message and "doc-" in message
    kept_name = f"step-{(step - 1) // 4 * 4:07d}"  # a checkpoint every 4 steps
    assert (
        "likely cause: divergence: the gradient norm rose" in message
        or "likely cause: the gradients overflowed" in (message)
    ), message
    assert f"{kept_name}, is kept (--resume continues from it" in message
    (partial,) = (tmp_path / "runs" / "artifacts").glob("train-*.partial")
    kept = latest_checkpoint(partial / "checkpoints")
    assert kept is not None and kept.name == kept_name
    assert all(torch.isfinite(t).all() for t in load_file(kept / "model.safetensors").values())
    logged = [line for line in (partial / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == step - 1  # the bad step was never taken

    notes: list[str] = []
    pipe = Pipeline(load_recipe(recipe, [*overrides, "train.spike_factor=0"]), tmp_path / "runs")
    pipe.reporter.note = notes.append  # type: ignore[method-assign]
    art = pipe.run("train", resume=True)
    assert art is not None and art.path.name == partial.name.removesuffix(".partial")
    assert f"train: resuming from {kept_name}" in notes


def test_post_training_names_its_section_and_the_examples(tmp_path: Path) -> None:
    model = tiny_decoder(64)
    cfg = SFTConfig(builtin="stdlib-functions", micro_batch_size=2, epochs=1, checkpoint_interval=2)
    steps: list[list[int]] = []

    at_bad_step: dict[str, torch.Tensor] = {}

    def step(items: list[int]) -> dict[str, float]:
        steps.append(items)
        if len(steps) == 4:  # the weights as the bad step finds them
            at_bad_step.update({k: v.clone() for k, v in model.state_dict().items()})
        loss = model(torch.tensor([[1, 2, 3, 4]]), targets=torch.tensor([[2, 3, 4, 5]]))[0]
        loss.backward()
        return {"loss": math.inf if len(steps) == 4 else loss.item(), "tokens": 4}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError) as err:
        run_steps(model, 10, cfg, 0, tmp_path, step)
    message = str(err.value)
    assert message.startswith("training stopped at sft step 4: the loss is inf")
    assert f"examples {', '.join(map(str, sorted(steps[3])))} of the 10 trained on" in message
    assert "step-0000002, is kept" in message
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # steps 1-3 were taken
    assert all(torch.equal(at_bad_step[k], v) for k, v in model.state_dict().items())  # the bad one was not
    kept = load_file(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
