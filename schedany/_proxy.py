"""The proxy optimizer a bound scheduler is built on (:mod:`schedany._binding`).

A scheduler only ever touches ``optimizer.param_groups[i]["lr"]`` plus its own
bookkeeping keys (``initial_lr``, ``max_lr``, ...). The proxy's groups are small views:
``"lr"`` is a copy of the target's value in the real group, every other key lives in the
view's private dict. So the user's param_groups only ever see the scheduled value, and
two schedules (or a raw torch scheduler on ``lr``) never see each other's bookkeeping.

A bare bound scheduler's views write through, one Python call per write. Inside a
:class:`~schedany.SynchronousSchedule` they are plain dicts, written at C speed, and the
coordinator copies them to the real groups in one pass per step
(:meth:`BoundOptimizer.defer_writes`, :func:`flush_views`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from ._clock import Unit
from ._targets import Target


class _GroupView(dict):
    """One param group as a bare scheduler sees it: ``"lr"`` is the target.

    The dict holds the scheduler's bookkeeping and a copy of the target's value
    under ``"lr"``. Reads are plain dict reads (torch makes three per group per
    step); :attr:`BoundOptimizer.param_groups` refreshes the copy when the real
    value may have changed, and writes go through to the real group. The real
    group is looked up by index: ``optimizer.load_state_dict`` replaces the group
    dicts, and the view must follow. It is never pickled: the proxy pickles its
    views as plain dicts and builds them again.
    """

    __slots__ = ("_owner", "_index", "_key")

    def __init__(
        self, owner: Optimizer, index: int, target: Target, contents: dict[str, Any]
    ) -> None:
        super().__init__(contents)  # dict's own init: no write-through
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

    def __init__(
        self, owner: Optimizer, index: int, target: Target, contents: dict[str, Any]
    ) -> None:
        super().__init__(owner, index, target, contents)
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


class _CheckedViews:
    """``BoundOptimizer.param_groups`` while the scheduler is bare: the views, checked
    against the real groups and refreshed if stale on every access (torch makes two or
    three per step), so that the next ``step()`` after ``optimizer.add_param_group()``
    raises instead of leaving the new group alone.

    A non-data descriptor, on purpose: once a coordinator takes the proxy over
    (:meth:`BoundOptimizer.defer_writes`), the plain list it puts in the instance dict
    hides this descriptor, the scheduler reads it at attribute speed, and the
    coordinator checks and refreshes once per step instead.
    """

    def __get__(self, proxy: BoundOptimizer | None, owner: type | None = None) -> Any:
        if proxy is None:
            return self
        views = proxy._views
        if len(proxy.optimizer.param_groups) != len(views):
            proxy.check_groups()
        if proxy.stale:
            proxy.refresh()
        return views


class BoundOptimizer(Optimizer):
    """The proxy a bound scheduler holds as ``scheduler.optimizer``.

    It owns no parameters: ``Optimizer.__init__`` is deliberately not called.
    ``defaults`` holds nothing, so OneCycleLR / CyclicLR find no momentum to cycle;
    it records that they looked (see :class:`_EmptyDefaults`).

    It pickles and deep-copies with the scheduler that holds it (see
    :meth:`__getstate__`); copy the optimizer with it, ``copy.deepcopy((optimizer,
    schedule))``, so that the copy drives the copied optimizer.
    """

    param_groups = _CheckedViews()  # type: ignore[assignment]

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
        # False: the views write through (a bare scheduler); True: plain dicts that a
        # coordinator refreshes and flushes around each step (see defer_writes).
        self._deferred = False
        self._install_views([{} for _ in optimizer.param_groups])
        # Where flush_views writes a view's "lr" whole; None for an element target.
        self._whole_key = target.key if target.index is None else None
        # The views' copies of the target are refreshed lazily, before the first
        # step after anything that may have changed the real value from outside this
        # schedule: an optimizer step (other schedules step after it),
        # optimizer.load_state_dict, or loading schedule state. One pass per step
        # instead of one per access keeps the proxy cheap.
        self.stale = True
        # torch warns "lr_scheduler.step() before optimizer.step()" unless the
        # optimizer it holds has stepped; the real optimizer's steps tell us.
        self._opt_called = False
        self._hooks = self._register_hooks()

    def _register_hooks(self) -> list[Any]:
        """Hooks on the real optimizer; they hold this proxy weakly, so a dropped
        schedule does not live on in the optimizer."""
        this = weakref.ref(self)
        return [
            self.optimizer.register_step_post_hook(_flag_setter(this, "_opt_called", "stale")),
            self.optimizer.register_load_state_dict_post_hook(_flag_setter(this, "stale")),
        ]

    def _install_views(self, contents: list[dict[str, Any]]) -> None:
        """Views holding ``contents``, of the kind the mode needs."""
        if self._deferred:
            self._views: list[dict[str, Any]] = [dict(c) for c in contents]
            self.param_groups = self._views  # hides _CheckedViews (see there)
        else:
            view = _GroupView if self.target.index is None else _ElementView
            self._views = [view(self.optimizer, i, self.target, c) for i, c in enumerate(contents)]
        # (view, real group) as of now; refresh() renews them, as loading the optimizer
        # replaces its group dicts. flush_views walks them (a zip per step costs more
        # than the copy itself at a few groups).
        self._pairs = list(zip(self._views, self.optimizer.param_groups))

    def check_groups(self) -> None:
        """Raise if the optimizer's param groups changed since binding."""
        bound, now = len(self._views), len(self.optimizer.param_groups)
        if bound != now:
            raise RuntimeError(
                f"the optimizer had {bound} param groups when {self.target.name!r} was "
                f"bound and has {now} now; rebuild the schedule after add_param_group()"
            )

    def refresh(self) -> None:
        """Copy the target's real values into the views' ``"lr"``, if they may have
        changed since the last refresh."""
        if not self.stale:
            return
        pairs, target = list(zip(self._views, self.optimizer.param_groups)), self.target
        set_item = dict.__setitem__  # not the write-through of a bare scheduler's views
        if target.index is None:
            key = target.key
            for view, group in pairs:
                set_item(view, "lr", group[key])
        else:
            key, index = target.key, target.index
            for view, group in pairs:
                set_item(view, "lr", group[key][index])
        self._pairs = pairs
        self.stale = False

    def defer_writes(self) -> None:
        """From now on the scheduler writes plain dicts, and the caller brings them up to
        date before each step (:meth:`check_groups`, :meth:`refresh` when
        :attr:`stale`) and copies them to the optimizer after it (:func:`flush_views`):
        one pass over the groups instead of a Python call per access and per write.

        A :class:`~schedany.SynchronousSchedule` calls it for each bound member at its
        first ``step()``. A member stepped on its own afterwards writes nothing to the
        optimizer until its coordinator's next step.
        """
        if not self._deferred:
            self._deferred = True
            self._install_views(self._views)

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
        self.stale = True

    def __getstate__(self) -> dict[str, Any]:
        """Everything that makes the proxy, for ``copy.deepcopy`` and pickle.

        ``Optimizer.__getstate__`` keeps only defaults, state and param_groups, which
        here would lose the proxy itself. Left out is what belongs to this very object:
        the hook handles on the real optimizer (a copied optimizer has none) and torch's
        wrapper of ``self.step`` (a closure on a weak reference to this proxy; torch
        looks for it on a scheduler's first ``step()`` only, and a raw torch scheduler's
        copy goes without it too). The views travel as plain dicts, so unpickling never
        writes through to a group.
        """
        skip = ("_hooks", "step", "param_groups", "_views", "_pairs")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state["_views"] = [dict(view) for view in self._views]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the views on the (copied) real optimizer and hook into it again."""
        self.__dict__.update(state)
        self._install_views(state["_views"])
        self._hooks = self._register_hooks()

    def __repr__(self) -> str:
        return f"BoundOptimizer({self.target.name!r} of {type(self.optimizer).__name__})"


def flush_views(proxies: list[BoundOptimizer]) -> None:
    """Copy each deferred proxy's values (its views' ``"lr"``) to the targets of the real
    groups: what a coordinator does after its members step (:meth:`BoundOptimizer.
    defer_writes`). One call for all of them keeps the fixed cost per step low."""
    for proxy in proxies:
        key = proxy._whole_key
        if key is not None:
            for view, group in proxy._pairs:
                group[key] = view["lr"]
        else:
            target = proxy.target
            for view, group in proxy._pairs:
                target.write(group, view["lr"])


def _flag_setter(proxy_ref: weakref.ref[BoundOptimizer], *flags: str) -> Callable[..., None]:
    """An optimizer hook that sets ``flags`` on the proxy, if it is still alive."""

    def hook(optimizer: Optimizer, *hook_args: Any) -> None:
        proxy = proxy_ref()
        if proxy is not None:
            for flag in flags:
                setattr(proxy, flag, True)

    return hook
