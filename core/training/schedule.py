"""The learning-rate schedule, and fitting it to a time budget."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class OneCycle:
    """PyTorch's ``OneCycleLR`` (two cosine phases; Adam's beta1 cycled 0.95 → 0.85 → 0.95),
    with a span (``total_steps``) that may change during the run, so that a time budget can
    shorten the schedule and the learning rate still anneals to its end. Its state is two of
    the numbers ``OneCycleLR`` keeps (``last_epoch`` = steps taken, ``total_steps``), so
    checkpoints written with ``OneCycleLR`` (Tessera 0.3.x) resume with it."""

    def __init__(self, opt: Any, max_lr: float, total_steps: int, pct_start: float = 0.05,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 base_momentum: float = 0.85, max_momentum: float = 0.95) -> None:
        self.opt, self.max_lr, self.total_steps = opt, max_lr, int(total_steps)
        self.pct_start, self.initial_lr = pct_start, max_lr / div_factor
        self.min_lr = self.initial_lr / final_div_factor
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        self.last_epoch = 0
        self._apply()

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def values(self, step: int) -> tuple[float, float]:
        """(learning rate, beta1) at ``step``, as ``OneCycleLR`` computes them."""
        end1, end2 = float(self.pct_start * self.total_steps) - 1, self.total_steps - 1
        if step <= end1:
            pct = step / end1 if end1 > 0 else 1.0
            return (self._cos(self.initial_lr, self.max_lr, pct),
                    self._cos(self.max_momentum, self.base_momentum, pct))
        pct = (step - end1) / (end2 - end1) if end2 > end1 else 1.0
        return (self._cos(self.max_lr, self.min_lr, pct),
                self._cos(self.base_momentum, self.max_momentum, pct))

    def _apply(self) -> None:
        lr, beta1 = self.values(self.last_epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
            g["betas"] = (beta1, *g["betas"][1:])

    def step(self) -> None:
        """Advance one optimizer step."""
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (steps taken, span) for a checkpoint."""
        return {"total_steps": self.total_steps, "last_epoch": self.last_epoch}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or a ``OneCycleLR`` state)."""
        self.total_steps, self.last_epoch = int(st["total_steps"]), int(st["last_epoch"])
        self._apply()



def fit_epochs(durations: list[float], left_s: float, done: int, plan: int, epochs: int) -> int:
    """The epochs a schedule should span so that it ends within a time budget.

    durations: this session's epochs in seconds (the first, which starts the workers and
    warms the caches, is left out once there are others); left_s: the budget's seconds left;
    done: epochs completed; plan: the current span; epochs: the recipe's. The span may grow
    back towards ``epochs`` during the first quarter of the plan and only shrinks after it;
    it is never less than ``done`` (``done`` = stop now: no further epoch fits).
    """
    per = float(np.median(durations[1:] if len(durations) > 1 else durations))
    fits = done + max(0, int(left_s // per)) if per > 0 else epochs
    new = min(epochs, fits)
    if done >= plan / 4:
        new = min(new, plan)
    return max(new, done)
