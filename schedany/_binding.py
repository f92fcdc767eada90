"""Bind an unmodified torch scheduler to any optimizer hyperparameter.

A scheduler only ever touches ``optimizer.param_groups[i]["lr"]`` plus its own
bookkeeping keys (``initial_lr``, ``max_lr``, ...). We hand it a proxy optimizer
whose groups are small views: ``"lr"`` reads and writes the target in the real
group, every other key lives in the view's private dict. So the user's
param_groups only ever see the scheduled value, and two schedules (or a raw
torch scheduler on ``lr``) never see each other's bookkeeping.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._clock import Unit, check_unit
from ._optimizer_utils import extend_optimizer
from ._rollback import unchanged_on_error
from ._targets import Target, parse_target
from .errors import TargetValueError, check_integer


class _GroupView(dict):
    """One param group as a scheduler sees it: ``"lr"`` is the target.

    The dict holds the scheduler's bookkeeping and a copy of the target's value
    under ``"lr"``. Reads are plain dict reads (torch makes three per group per
    step); :attr:`BoundOptimizer.param_groups` refreshes the copy when the real
    value may have changed, and writes go through to the real group. The real
    group is looked up by index: ``optimizer.load_state_dict`` replaces the group
    dicts, and the view must follow.
    """

    __slots__ = ("_owner", "_index", "_key")

    def __init__(self, owner: Optimizer, index: int, target: Target) -> None:
        super().__init__()
        self._owner = owner
        self._index = index
        self._key = target.key

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "lr":
            self._owner.param_groups[self._index][self._key] = value
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        if key == "lr":
            raise KeyError(f"cannot delete the scheduled value {self._key!r}")
        dict.__delitem__(self, key)


class _ElementView(_GroupView):
    """A view whose ``"lr"`` is one element of a tuple/list key (``"betas[0]"``)."""

    __slots__ = ("_target",)

    def __init__(self, owner: Optimizer, index: int, target: Target) -> None:
        super().__init__(owner, index, target)
        self._target = target

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "lr":
            self._target.write(self._owner.param_groups[self._index], value)
        dict.__setitem__(self, key, value)


class _EmptyDefaults(dict):
    """The proxy's ``defaults``: empty, but it remembers whether a scheduler asked for
    the optimizer's momentum (OneCycleLR and CyclicLR do, to cycle it), so a failure
    that follows can be explained by what happened, not by the error's wording."""

    __slots__ = ("asked_for_momentum",)

    def __init__(self) -> None:
        super().__init__()
        self.asked_for_momentum = False

    def __contains__(self, key: object) -> bool:
        if key in ("momentum", "betas"):
            self.asked_for_momentum = True
        return super().__contains__(key)


class BoundOptimizer(Optimizer):
    """The proxy a bound scheduler holds as ``scheduler.optimizer``.

    It owns no parameters: ``Optimizer.__init__`` is deliberately not called.
    ``defaults`` holds nothing, so OneCycleLR / CyclicLR find no momentum to cycle;
    it records that they looked (see :class:`_EmptyDefaults`).
    """

    def __init__(
        self, optimizer: Optimizer, target: Target, unit: Unit = "steps", every: int = 1
    ) -> None:
        self.optimizer = optimizer
        self.target = target
        # What one step() of the scheduler stands for (docs/clock.md): ``every`` of
        # ``unit`` on the coordinator's clock.
        self.unit = unit
        self.every = every
        self.defaults = _EmptyDefaults()
        self.state: dict[Any, Any] = {}
        view = _GroupView if target.index is None else _ElementView
        self._views = [view(optimizer, i, target) for i in range(len(optimizer.param_groups))]
        # The views' copies of the target are refreshed lazily, on the first
        # param_groups access after anything that may have changed the real value
        # from outside this schedule: an optimizer step (other schedules step
        # after it), optimizer.load_state_dict, or loading schedule state. One
        # pass per step instead of one per access keeps the proxy cheap.
        self._stale = True
        # torch warns "lr_scheduler.step() before optimizer.step()" unless the
        # optimizer it holds has stepped; the real optimizer's steps tell us.
        self._opt_called = False
        this = weakref.ref(self)
        self._hooks = [
            optimizer.register_step_post_hook(_flag_setter(this, "_opt_called", "_stale")),
            optimizer.register_load_state_dict_post_hook(_flag_setter(this, "_stale")),
        ]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The views, their ``"lr"`` refreshed from the real groups if stale."""
        views = self._views
        if not self._stale:
            return views  # type: ignore[return-value]
        groups, target = self.optimizer.param_groups, self.target
        if len(groups) != len(views):
            raise RuntimeError(
                f"the optimizer had {len(views)} param groups when {target.name!r} was bound "
                f"and has {len(groups)} now; rebuild the schedule after add_param_group()"
            )
        set_item = dict.__setitem__
        if target.index is None:
            key = target.key
            for view, group in zip(views, groups):
                set_item(view, "lr", group[key])
        else:
            key, index = target.key, target.index
            for view, group in zip(views, groups):
                set_item(view, "lr", group[key][index])
        self._stale = False
        return views  # type: ignore[return-value]

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        # Never called by schedany; torch's schedulers wrap it to track step order.
        return self.optimizer.step(closure)

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def bookkeeping_state(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in view.items() if k != "lr"} for view in self._views]

    def load_bookkeeping(self, state: list[dict[str, Any]]) -> None:
        if len(state) != len(self._views):
            raise ValueError(
                f"schedule {self.target.name!r} was saved with {len(state)} param groups, "
                f"the optimizer has {len(self._views)}"
            )
        for view, saved in zip(self._views, state):
            lr = view.get("lr")
            dict.clear(view)
            dict.update(view, saved)
            dict.__setitem__(view, "lr", lr)
        self._stale = True

    def __repr__(self) -> str:
        return f"BoundOptimizer({self.target.name!r} of {type(self.optimizer).__name__})"


def _flag_setter(proxy_ref: weakref.ref[BoundOptimizer], *flags: str) -> Callable[..., None]:
    """An optimizer hook that sets ``flags`` on the proxy, if it is still alive."""

    def hook(optimizer: Optimizer, *hook_args: Any) -> None:
        proxy = proxy_ref()
        if proxy is not None:
            for flag in flags:
                setattr(proxy, flag, True)

    return hook


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
                extend_optimizer(optimizer, target.key, default_value)
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
