"""A run's optimizer, schedule and controller rebuilt from a config at the clock's reading,
keeping the training state: the one mechanism behind PBT's restore into an explored
config (docs/tuning.md), ``schedany train CONFIG --from CHECKPOINT`` and the live
``set`` and ``cooldown`` edits (docs/live_control.md).

What carries over is the optimizer's *state* (moments, step counts), the controller's
state, the model, the data position and the clock. Every param group then holds the new
config's hyperparameters, each scheduled key at its value for the clock's reading; a
live cooldown replaces its key's schedule by a :class:`Cooldown`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from .. import curves
from .._binding import arbitrary_schedule_factory
from .._clock import Clock, Unit
from .._synchronous import SynchronousSchedule
from .._targets import parse_target
from ..config import Run, TrainConfig
from ..curves import DecayShape
from ._trainer_parts import TrainerParts
from .build import build_controller, build_guard, build_run

__all__ = ["Cooldown", "advance", "build_with_cooldowns", "rebuild_at_step", "rebuild_run"]

_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def advance(schedule: SynchronousSchedule, steps: int) -> None:
    """Step ``schedule`` ``steps`` times without training (replaying its curve).

    Replaying, rather than jumping, works for every torch scheduler, including the
    chainable ones (StepLR, ExponentialLR) whose value depends on the previous one. A
    schedule with a clock follows the clock instead: set to the restored reading, one
    ``step()`` brings every member there (docs/clock.md).
    """
    if steps < 0:
        raise ValueError(f"advance: steps must be >= 0, got {steps}")
    with warnings.catch_warnings():
        # No optimizer step happens here on purpose: the schedule is only positioned.
        warnings.filterwarnings("ignore", message=_ORDER_WARNING, category=UserWarning)
        if schedule.clock is not None:
            schedule.step()
            schedule.last_epoch = steps
            return
        for _ in range(steps):
            schedule.step()


def rebuild_at_step(
    optimizer: Optimizer,
    schedule: SynchronousSchedule,
    optimizer_state: Mapping[str, Any],
    step: int,
    *,
    controller: Any = None,
    controller_state: Mapping[str, Any] | None = None,
) -> None:
    """Load a checkpoint's optimizer (and controller) state into an optimizer and
    schedule (and controller) freshly built from the current config, with the schedule
    positioned at ``step``.

    Loading the old schedule's state would bring back the old curve and its values in
    the optimizer. So only the optimizer's *state* (moments, step counts) comes from
    ``optimizer_state``: afterwards every param group holds the current config's
    hyperparameters, the scheduled ones at their value for ``step``. A sweep file allows
    PBT to mutate only what this keeps consistent (``PBT_MUTABLE_BLOCKS`` of
    ``integrations._sweep``); a live edit only ``schedules.*`` and the budget.
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
    if controller is not None and controller_state is not None:
        controller.load_state_dict(controller_state)


@dataclass(frozen=True)
class Cooldown:
    """``target`` from ``start_values`` to ``end_values`` (one per param group) over
    ``over`` units of ``unit``, counted from the clock reading ``start``, along ``shape``;
    then it stays at ``end_values``.

    value(t) = V + (v0 - V) * shape(p), p = (t - start) / over clamped to [0, 1], with
    WSD's decay shapes (``linear``: 1 - p, ``cosine``: (1 + cos(pi p)) / 2, ``sqrt``:
    1 - sqrt(p)): the decay of :func:`schedany.curves.warmup_stable_decay`, started at
    ``start``. At ``t = start`` the value is ``v0``, the value the old schedule had
    there, so the curve does not jump.
    """

    target: str
    unit: Unit
    start: int
    over: int
    shape: DecayShape
    start_values: tuple[float, ...]
    end_values: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["start_values"], out["end_values"] = list(self.start_values), list(self.end_values)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cooldown:
        values = dict(data)
        values["start_values"] = tuple(float(v) for v in values["start_values"])
        values["end_values"] = tuple(float(v) for v in values["end_values"])
        return cls(**values)

    def member(self, optimizer: Optimizer, bases: list[float]) -> LRScheduler:
        """The schedule on ``optimizer``: a ``LambdaLR`` with one lambda per group,
        ``value / base`` (``bases``: each group's value before scheduling; a group whose
        base is 0 stays at 0, as any multiplicative schedule keeps it)."""
        remaining = curves.warmup_stable_decay(
            1.0, 0.0, 0, self.start + self.over, self.over, self.shape
        )

        def multiplier(base: float, v0: float, end: float) -> curves.Curve:
            if base == 0:
                return lambda t: 0.0
            return lambda t: (end + (v0 - end) * remaining(t)) / base

        lambdas = [
            multiplier(b, v0, end) for b, v0, end in zip(bases, self.start_values, self.end_values)
        ]
        return arbitrary_schedule_factory(
            optimizer,
            lambda proxy: LambdaLR(proxy, lambdas),
            schedule_target=self.target,
            unit=self.unit,
        )


def build_with_cooldowns(
    config: TrainConfig,
    model: nn.Module,
    clock: Clock,
    cooldowns: Mapping[str, Cooldown] | None = None,
) -> Run:
    """:func:`schedany.job.build.build_run`, each key of ``cooldowns`` driven by its
    :class:`Cooldown` instead of its config entry. The schedule is fresh (last_epoch 0)."""
    optimizer, schedule = build_run(config, model, clock=clock)
    if not cooldowns:
        return Run(optimizer, schedule)
    members = schedule.schedules
    for name, cooldown in cooldowns.items():
        replaced = members[name]
        bases = [float(b) for b in replaced.base_lrs]
        replaced.optimizer.detach()  # type: ignore[attr-defined]
        # The new member takes each group's current value as its base: put back the
        # config's value, which the replaced member's first step overwrote.
        target = parse_target(name)
        for group, base in zip(optimizer.param_groups, bases):
            target.write(group, base)
        members[name] = cooldown.member(optimizer, bases)
    return Run(optimizer, SynchronousSchedule(list(members.values()), clock=clock))


def rebuild_run(
    trainer: TrainerParts, config: TrainConfig, cooldowns: Mapping[str, Cooldown] | None = None
) -> None:
    """Give ``trainer`` an optimizer, schedule, controller and guard built from ``config``
    (and ``cooldowns``) at its clock's reading and step, keeping the optimizer's, the
    controller's and the guard's state; ``trainer.config`` becomes ``config``. Every
    rank does the same."""
    clock = Clock()
    clock.load_state_dict(trainer.clock.state_dict())
    optimizer, schedule = build_with_cooldowns(config, trainer.model, clock, cooldowns)
    controller = build_controller(config, trainer.model, optimizer)
    saved = None if trainer.controller is None else trainer.controller.state_dict()
    rebuild_at_step(
        optimizer,
        schedule,
        trainer.optimizer.state_dict(),
        trainer.step,
        controller=controller,
        controller_state=saved,
    )
    guard = build_guard(config, trainer.model, optimizer)  # it reads the new optimizer
    if guard is not None and trainer.guard is not None:
        guard.load_state_dict(trainer.guard.state_dict())
    trainer.config, trainer.clock, trainer.guard = config, clock, guard
    trainer.optimizer, trainer.schedule, trainer.controller = optimizer, schedule, controller
