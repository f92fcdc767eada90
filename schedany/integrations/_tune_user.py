"""Report and restore from your own Tune function trainable, the way the reference job does.

.. code-block:: python

    from schedany.integrations import ray_tune

    def my_trainable(config):
        model = build_model(); optimizer = build_optimizer(model, config)
        schedule = build_schedule(optimizer, spec_from(config))  # t = 0 (schedany.config)
        start = ray_tune.restore(model=model, optimizer=optimizer, schedule=schedule)
        for step in range(start + 1, steps + 1):
            loss = train_one_step(model, optimizer)     # ... optimizer.step()
            if step % every == 0:
                ray_tune.report(step, schedule, {"train/loss": loss},
                                model=model, optimizer=optimizer)
            schedule.step()

Call :func:`report` after ``optimizer.step()`` and before ``schedule.step()``: the
reported values are then the ones that step used, as the reference job reports them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .._record import StepRecord, schedule_tags
from .._synchronous import SynchronousSchedule
from ._tune_restore import rebuild_at_step

__all__ = ["report", "restore", "schedule_metrics"]


def schedule_metrics(schedule: SynchronousSchedule, controller: Any = None) -> dict[str, float]:
    """``schedule/<key>/<group>`` for every scheduled key and param group, and
    ``control/<metric>`` for a controller: the names TensorBoard shows
    (docs/inspecting_schedules.md). Two groups with the same label are a ``ValueError``,
    as in :class:`~schedany.integrations.tensorboard.ScheduleLogger`."""
    return StepRecord.read(schedule, controller).scalars(schedule_tags(schedule))


def report(
    step: int,
    schedule: SynchronousSchedule,
    metrics: Mapping[str, float] | None = None,
    *,
    model: nn.Module | None = None,
    optimizer: Optimizer | None = None,
    controller: Any = None,
) -> None:
    """``tune.report`` of ``global_step``, the scheduled values and ``metrics``.

    With ``model`` and ``optimizer`` it also reports a checkpoint (model, optimizer,
    schedule, controller, step) that :func:`restore` reads back.
    """
    from ray import tune

    from ..job.checkpoint import save_checkpoint

    values = {"global_step": int(step), **schedule_metrics(schedule, controller), **(metrics or {})}
    if model is None or optimizer is None:
        tune.report(values)
        return
    state = {
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "controller": None if controller is None else controller.state_dict(),
    }
    folder = Path(tempfile.mkdtemp(prefix="schedany-tune-"))
    try:
        save_checkpoint(folder, int(step), state, keep_last=1)
        tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restore(
    *,
    model: nn.Module,
    optimizer: Optimizer,
    schedule: SynchronousSchedule,
    controller: Any = None,
) -> int:
    """Load this trial's Tune checkpoint (a PBT donor's, after an exploit) and return
    its step; 0 without one.

    ``optimizer`` and ``schedule`` must be freshly built from the trial's *current*
    config. The schedule is positioned at the restored step on its own curve, and the
    optimizer keeps the checkpoint's state but the current config's hyperparameters
    (see :func:`~schedany.integrations._tune_restore.rebuild_at_step`): after a PBT
    exploit, the explored values win over the donor's.
    """
    from ray import tune

    from ..job.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        ref = latest_valid_checkpoint(folder)
        if ref is None:
            raise CheckpointError(f"Tune checkpoint {folder} holds no valid schedany checkpoint")
        state = load_checkpoint(ref)
    model.load_state_dict(state["model"])
    step = int(state["step"])
    rebuild_at_step(optimizer, schedule, state["optimizer"], step)
    if controller is not None and state["controller"] is not None:
        controller.load_state_dict(state["controller"])
    return step
