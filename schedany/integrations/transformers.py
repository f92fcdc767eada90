"""Hugging Face ``Trainer``: every scheduled value in the trainer's logs.

:class:`ScheduleCallback` adds ``schedule/<key>/<group>`` (docs/inspecting_schedules.md)
to each training log, so ``trainer.state.log_history`` and every reporting callback
called after it (TensorBoard, W&B, ...) see weight decay, betas and custom keys, not
only the learning rate (docs/integrations.md, "Hugging Face Trainer").

The HF Trainer runs its own accumulation loop (a fixed ``gradient_accumulation_steps``),
so a reactive controller (LogicalBatchSize, GradientNormThreshold) cannot decide there
when the optimizer steps: it needs a custom loop, shown in docs/integrations.md.

Needs ``transformers`` (``pip install schedany[transformers]``); importing
:mod:`schedany` does not import this module.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LRScheduler
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .._record import StepRecord, schedule_tags
from .._synchronous import SynchronousSchedule

__all__ = ["ScheduleCallback"]


class ScheduleCallback(TrainerCallback):
    """Adds every ``schedule/<key>/<group>`` of the Trainer's schedule to its training logs.

    Pass your optimizer and schedule as ``Trainer(optimizers=(optimizer, schedule))``;
    the schedule is a :class:`~schedany.SynchronousSchedule`, a bound scheduler or any
    torch scheduler (the Trainer's own, without ``optimizers=``, logs as ``lr``).

    The values are read just before each optimizer step, so a log at step ``s`` holds
    the values optimizer step ``s`` used, as the Trainer's own ``learning_rate`` does.
    ``learning_rate`` is rewritten to the optimizer's learning rate (group 0): the
    Trainer asks the scheduler for it, which for a scheduler bound to another key is
    that key's value (a weight-decay schedule would show as the learning rate).

    Reporting integrations named in ``report_to`` are called before the callbacks you
    pass, so they miss these keys: use ``report_to="none"`` and pass them after this
    one, ``callbacks=[ScheduleCallback(), TensorBoardCallback()]``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data,  # doctest: +SKIP
        ...                   optimizers=(optimizer, schedule), callbacks=[ScheduleCallback()])
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.state.log_history[0]["schedule/weight_decay/pg0"]  # doctest: +SKIP
        0.1
    """

    def __init__(self) -> None:
        self._scheduler: Any = None
        self._schedule: SynchronousSchedule | None = None
        self._values: dict[str, float] = {}

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        schedule = self._coordinator(lr_scheduler)
        values = StepRecord.read(schedule).scalars(schedule_tags(schedule))
        values["learning_rate"] = float(schedule.optimizer.param_groups[0]["lr"])
        self._values = values

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Training logs are the ones with the Trainer's learning_rate (not eval or the
        # closing summary).
        if logs is None or "learning_rate" not in logs or not self._values:
            return
        logs.update(self._values)
        # The Trainer appended a copy of the logs to log_history before calling us.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "learning_rate" in last:
            last.update(self._values)

    def _coordinator(self, scheduler: Any) -> SynchronousSchedule:
        if scheduler is self._scheduler and self._schedule is not None:
            return self._schedule
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(
                "ScheduleCallback: the Trainer's lr_scheduler must be a torch LRScheduler "
                f"(a SynchronousSchedule, a bound or a stock scheduler), got "
                f"{type(scheduler).__name__}"
            )
        self._scheduler = scheduler
        self._schedule = (
            scheduler
            if isinstance(scheduler, SynchronousSchedule)
            else SynchronousSchedule([scheduler])
        )
        return self._schedule
