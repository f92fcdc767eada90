"""Restore into a possibly mutated config: the new schedule wins, at the restored step.

PBT restarts a trial from a donor's checkpoint with explored hyperparameters. Loading
the donor's schedule state would bring back the donor's curve (and its values in the
optimizer); so the schedule is instead rebuilt from the trial's own config, stepped to
the restored step, and every optimizer hyperparameter is rewritten from it before the
next optimizer step. Only the optimizer's *state* (moments, step counts) comes from
the checkpoint. Does not import ray.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer

from .._synchronous import SynchronousSchedule

__all__ = ["advance", "rebuild_at_step"]

_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def advance(schedule: SynchronousSchedule, steps: int) -> None:
    """Step ``schedule`` ``steps`` times without training (replaying its curve).

    Replaying, rather than jumping, works for every torch scheduler, including the
    chainable ones (StepLR, ExponentialLR) whose value depends on the previous one.
    """
    if steps < 0:
        raise ValueError(f"advance: steps must be >= 0, got {steps}")
    with warnings.catch_warnings():
        # No optimizer step happens here on purpose: the schedule is only positioned.
        warnings.filterwarnings("ignore", message=_ORDER_WARNING, category=UserWarning)
        for _ in range(steps):
            schedule.step()


def rebuild_at_step(
    optimizer: Optimizer,
    schedule: SynchronousSchedule,
    optimizer_state: Mapping[str, Any],
    step: int,
) -> None:
    """Position a freshly built ``schedule`` at ``step`` and load ``optimizer_state``.

    ``optimizer`` and ``schedule`` must have just been built from the trial's
    current config (the schedule at t = 0). Afterwards the optimizer holds the
    checkpoint's state (moments, step counts) and, in every param group, the current
    config's hyperparameters, the scheduled ones at their value for ``step`` — never
    the checkpoint's.
    """
    if schedule.last_epoch != 0:
        raise ValueError(
            f"rebuild_at_step needs a schedule fresh from its config (last_epoch 0), "
            f"got last_epoch {schedule.last_epoch}"
        )
    advance(schedule, step)
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(dict(optimizer_state))
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
