"""Bind an unmodified torch scheduler to any optimizer hyperparameter.

:func:`arbitrary_schedule_factory` builds the user's scheduler on a
:class:`~schedany._proxy.BoundOptimizer` whose ``"lr"`` is the target, and returns the
scheduler itself; the helpers below read what a scheduler is bound to.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._clock import Unit, check_unit
from ._optimizer_utils import add_key
from ._proxy import BoundOptimizer
from ._rollback import unchanged_on_error
from ._targets import Target, parse_target
from .errors import TargetValueError, check_integer


def bound_unit(scheduler: LRScheduler) -> tuple[Unit, int]:
    """``(unit, every)``: one ``step()`` of ``scheduler`` per ``every`` of ``unit``; a raw
    torch scheduler counts optimizer steps."""
    proxy = scheduler.optimizer
    return (proxy.unit, proxy.every) if isinstance(proxy, BoundOptimizer) else ("steps", 1)


def bound_target(scheduler: LRScheduler) -> Target | None:
    """The target of a scheduler built by the factory, or None for a raw one."""
    proxy = scheduler.optimizer
    return proxy.target if isinstance(proxy, BoundOptimizer) else None


def real_optimizer(scheduler: LRScheduler) -> Optimizer:
    proxy = scheduler.optimizer
    return proxy.optimizer if isinstance(proxy, BoundOptimizer) else proxy


def arbitrary_schedule_factory(
    optimizer: Optimizer,
    schedule_factory: Callable[[Optimizer], LRScheduler],
    default_value: float | None = None,
    schedule_target: str = "lr",
    unit: Unit = "steps",
    every: int = 1,
) -> LRScheduler:
    """Build a stock torch scheduler that drives ``schedule_target`` instead of ``lr``.

    Args:
        optimizer: the real optimizer.
        schedule_factory: ``proxy -> scheduler``, e.g. ``lambda opt: StepLR(opt, 30)``.
            It must build the scheduler on the proxy it is given.
        default_value: if the key is missing from a group, it is added first.
        schedule_target: a numeric param_group key or ``"key[index]"`` of a tuple key.
        unit: what the scheduler's steps count: ``"steps"`` (optimizer steps),
            ``"samples"`` or ``"tokens"``; a unit other than steps needs a
            :class:`~schedany.SynchronousSchedule` with a clock (docs/clock.md).
        every: the scheduler takes one ``step()`` per ``every`` of ``unit``.

    Returns:
        The scheduler itself (``isinstance(s, StepLR)`` holds), bound to a proxy.

    On any error the optimizer's param_groups are left as they were.

    Example:
        >>> import torch
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], weight_decay=0.1)
        >>> s = arbitrary_schedule_factory(
        ...     opt, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        ...     schedule_target="weight_decay")
        >>> for _ in range(4):
        ...     opt.step(); s.step(); print(opt.param_groups[0]["weight_decay"])
        0.1
        0.05
        0.05
        0.025
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, BoundOptimizer):
        raise TypeError("optimizer is a schedany proxy; pass the real optimizer (proxy.optimizer)")
    if not callable(schedule_factory):
        raise TypeError(
            f"schedule_factory must be callable (proxy -> scheduler), got {schedule_factory!r}"
        )
    target = parse_target(schedule_target)
    unit = check_unit(unit, "arbitrary_schedule_factory")
    every = check_integer(every, "every", min=1, func="arbitrary_schedule_factory")

    proxy: BoundOptimizer | None = None
    with unchanged_on_error(optimizer):
        try:
            if default_value is not None:
                if target.index is not None:
                    raise TargetValueError(
                        "schedule_target",
                        target.name,
                        f"default_value={default_value!r} cannot create an element target; "
                        f"extend the optimizer with the whole {target.key!r} value first",
                    )
                add_key(optimizer, target.key, default_value)
            target.validate(optimizer)
            proxy = BoundOptimizer(optimizer, target, unit, every)
            return _build_on(proxy, schedule_factory)
        except BaseException:
            if proxy is not None:
                proxy.detach()
            raise


def _build_on(
    proxy: BoundOptimizer, schedule_factory: Callable[[Optimizer], LRScheduler]
) -> LRScheduler:
    """Call the user's factory on the proxy and check what it built."""
    try:
        scheduler = schedule_factory(proxy)
    except ValueError as error:
        if proxy.defaults.asked_for_momentum:
            raise TargetValueError(
                "schedule_target",
                proxy.target.name,
                "momentum cycling (cycle_momentum=True, the OneCycleLR/CyclicLR default) "
                "cannot run on a bound schedule; pass cycle_momentum=False, and schedule "
                "the momentum key with its own schedule",
            ) from error
        raise
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(
            f"schedule_factory must return a torch.optim.lr_scheduler.LRScheduler, "
            f"got {type(scheduler).__name__}: {scheduler!r}"
        )
    if scheduler.optimizer is not proxy:
        raise ValueError(
            f"schedule_factory built its {type(scheduler).__name__} on "
            f"{type(scheduler.optimizer).__name__}, not on the proxy it was given; "
            "write it as `lambda opt: Scheduler(opt, ...)`"
        )
    return scheduler
