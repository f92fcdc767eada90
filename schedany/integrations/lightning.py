"""Lightning: every scheduled value, and a controller's metrics, in the trainer's loggers.

:class:`ScheduleMonitor` is Lightning's ``LearningRateMonitor`` for every key a
:class:`~schedany.SynchronousSchedule` drives (docs/integrations.md, "Lightning"). It
logs ``schedule/<key>/<group>`` (docs/inspecting_schedules.md), ``control/<metric>`` and
``guard/<metric>`` through ``trainer.loggers``, on Lightning's own step axis and
cadence (``log_every_n_steps``), so they line up with what ``self.log`` writes.

Subclasses ``lightning.pytorch.Callback`` (``pip install schedany[lightning]``); where
only the older ``pytorch_lightning`` package is installed, its ``Callback``. Importing
:mod:`schedany` does not import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.optim.lr_scheduler import LRScheduler

from .._record import Controller, StepRecord, schedule_tags
from .._synchronous import SynchronousSchedule

try:
    import lightning.pytorch as pl
except ImportError:  # only the standalone package is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["ScheduleMonitor"]

MetricsSource = Controller | str
"""An object with ``metrics() -> dict[str, float]``, or the name of the LightningModule
attribute that holds one (read at every logging step, so it may be built in
``configure_optimizers``, after Lightning wrapped the model)."""


def _check_source(value: MetricsSource | None, argument: str) -> None:
    if value is None or isinstance(value, str):
        return
    if not callable(getattr(value, "metrics", None)):
        raise TypeError(
            f"ScheduleMonitor: {argument} must have a metrics() method or be the name of a "
            f"LightningModule attribute that holds one, got {type(value).__name__}"
        )


def _as_schedule(scheduler: LRScheduler) -> SynchronousSchedule:
    """``scheduler`` itself if it is a coordinator, else a one-member coordinator that
    reads it (a raw torch scheduler logs as ``lr``, a bound one under its target)."""
    if isinstance(scheduler, SynchronousSchedule):
        return scheduler
    return SynchronousSchedule([scheduler])


class ScheduleMonitor(pl.Callback):
    """Logs every ``schedule/<key>/<group>`` of the trainer's schedules, and the metrics
    of a controller and a gradient guard, through ``trainer.loggers``.

    The schedules are the ones ``configure_optimizers`` returned (each a
    :class:`~schedany.SynchronousSchedule`, or any torch scheduler). Values are read
    just before each optimizer step, so the point at a step is the value that optimizer
    step used, in automatic and in manual optimization alike. The step axis and cadence
    are Lightning's: a point at ``trainer.global_step`` (optimizer steps before this
    one), on the steps where ``log_every_n_steps`` has Lightning log ``self.log`` values.

    Args:
        controller: a :class:`~schedany.LogicalBatchSize` or
            :class:`~schedany.GradientNormThreshold` (anything with ``metrics()``), or
            the name of the LightningModule attribute that holds it; logged as
            ``control/<metric>``.
        guard: a gradient guard (anything with ``metrics()``), or the name of the
            attribute that holds it; logged as ``guard/<metric>``.

    Raises ``ValueError`` at the start of training when two schedules log under the
    same name (give the param groups distinct ``name`` entries).

    Example:
        >>> trainer = Trainer(callbacks=[ScheduleMonitor(controller="gnts")])  # doctest: +SKIP
    """

    def __init__(
        self, controller: MetricsSource | None = None, guard: MetricsSource | None = None
    ) -> None:
        super().__init__()
        _check_source(controller, "controller")
        _check_source(guard, "guard")
        self.controller = controller
        self.guard = guard
        self._schedules: list[SynchronousSchedule] = []
        self._logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedules = [
            _as_schedule(config.scheduler)
            for config in trainer.lr_scheduler_configs
            if isinstance(config.scheduler, LRScheduler)
        ]
        self._check_names()
        self._logged_step = -1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        every = trainer.log_every_n_steps
        # Once per step (several optimizers may step in one), where Lightning logs too.
        if step == self._logged_step or every == 0 or (step + 1) % every:
            return
        self._logged_step = step
        if not trainer.is_global_zero or not trainer.loggers:
            return
        scalars = self.scalars(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def scalars(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """What one logging step writes: every schedule's values, then the controller's
        and the guard's metrics."""
        out: dict[str, float] = {}
        for schedule in self._schedules:
            out.update(StepRecord.read(schedule).scalars(schedule_tags(schedule)))
        for prefix, source in (("control", self.controller), ("guard", self.guard)):
            metrics = self._metrics_of(source, pl_module)
            if metrics is not None:
                out.update({f"{prefix}/{name}": float(v) for name, v in metrics.items()})
        return out

    def _metrics_of(
        self, source: MetricsSource | None, pl_module: pl.LightningModule
    ) -> Mapping[str, float] | None:
        if isinstance(source, str):
            name = source
            if not hasattr(pl_module, name):
                raise AttributeError(
                    f"ScheduleMonitor: {type(pl_module).__name__} has no attribute "
                    f"{name!r} (the controller or guard to log)"
                )
            source = getattr(pl_module, name)
            if source is not None:
                _check_source(source, f"{type(pl_module).__name__}.{name}")
        return None if source is None else source.metrics()

    def _check_names(self) -> None:
        seen: dict[str, int] = {}
        for i, schedule in enumerate(self._schedules):
            for tags in schedule_tags(schedule).values():
                for tag in tags:
                    if tag in seen:
                        raise ValueError(
                            f"ScheduleMonitor: lr_schedulers[{seen[tag]}] and "
                            f"lr_schedulers[{i}] both log {tag!r}; give their optimizers' "
                            "param groups distinct 'name' entries"
                        )
                    seen[tag] = i
