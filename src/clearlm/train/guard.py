"""Stop training at the first step whose loss is not a number or spikes, before that step changes the weights.

A diverged run wastes the rest of its compute, and a NaN that reaches a checkpoint spoils every resume from it.
Stopping at the bad step keeps the last good checkpoint and says what to look at: the step, its batch and the
likely cause. A gradient norm that rose over the steps before points at the optimisation (learning rate,
warm-up, clipping); a steady one points at the batch itself.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clearlm.errors import TrainingError
from clearlm.train.checkpoint_files import latest_checkpoint

WINDOW = 20  # earlier steps whose median a spike is measured against
MIN_HISTORY = 5  # no spike is called before this many steps: the first losses fall fast
MIN_RISE = 1.0  # nats: near-zero losses (late SFT, DPO) wobble by large factors without diverging
GROWTH = 3.0  # a gradient norm this many times its recent median means the optimisation diverged


class LossGuard:
    """Checks each step's loss and gradient norm against the steps before it.

    `history` is the (loss, gradient norm) of the steps already taken, read back from the log on resume so that a
    resumed run stops where the uninterrupted one would. `section` names the recipe section in messages."""

    def __init__(self, factor: float, section: str, records: list[dict[str, Any]], checkpoints: Path) -> None:
        self.factor, self.section, self.checkpoints = factor, section, checkpoints
        self.history = [(r["loss"], r["grad_norm"]) for r in records if "loss" in r and "grad_norm" in r]

    def check(self, step: int, loss: float, grad_norm: float, lr: float, batch: Callable[[], str]) -> None:
        """Raise TrainingError naming the step, the batch (described only then), the likely cause and the
        checkpoint kept; or remember the step as a good one."""
        problem = self._problem(loss, grad_norm)
        if problem is None:
            self.history.append((loss, grad_norm))
            return
        raise TrainingError(
            f"training stopped at {self.section} step {step}: {problem}; batch: {batch()}; likely cause: "
            f"{self._cause(grad_norm, lr)}; {self._kept(spike=math.isfinite(loss) and math.isfinite(grad_norm))}"
        )

    def _problem(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm} (loss {loss:.4g})"
        recent = [past for past, _ in self.history[-WINDOW:]]
        if self.factor <= 0 or len(recent) < MIN_HISTORY:
            return None
        median = statistics.median(recent)
        if median > 0 and loss > self.factor * median and loss - median > MIN_RISE:
            return (
                f"the loss {loss:.4g} is {loss / median:.1f} times the median {median:.4g} of the {len(recent)} steps "
                f"before ({self.section}.spike_factor = {self.factor:g})"
            )
        return None

    def _cause(self, grad_norm: float, lr: float) -> str:
        if not self.history:
            return "the initial weights or this batch, since no update has been made yet"
        norms = [norm for _, norm in self.history[-WINDOW:]]
        typical = statistics.median(norms)
        advice = f"lower {self.section}.lr, lengthen the warm-up or clip harder ({self.section}.grad_clip)"
        if not math.isfinite(grad_norm):
            return f"the gradients overflowed at learning rate {lr:.3g} (norm {typical:.3g} before); {advice}"
        latest = max([*norms[-3:], grad_norm])
        if latest > GROWTH * typical:
            return (
                f"divergence: the gradient norm rose from {typical:.3g} to {latest:.3g} at learning rate {lr:.3g}; "
                + advice
            )
        return (
            f"this batch rather than divergence (the gradient norm was steady near {typical:.3g}): look at its "
            f"data, or raise {self.section}.spike_factor if the rise is expected"
        )

    def _kept(self, spike: bool) -> str:
        """Where the run stands. Resuming replays the same steps, so it gets past a spike only with a higher
        spike_factor (not part of the run's identity); other fixes (learning rate, clipping) start a new run."""
        found = latest_checkpoint(self.checkpoints)
        if found is None:
            return f"no checkpoint was written before it ({self.section}.checkpoint_interval keeps some)"
        how = f" with a higher {self.section}.spike_factor" if spike else " only into the same fault"
        return f"the last good checkpoint, {found}, is kept (--resume continues from it{how})"
