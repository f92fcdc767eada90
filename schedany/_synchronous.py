"""SynchronousSchedule: several schedules on one optimizer, stepped as one."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from ._binding import bound_target, bound_unit, real_optimizer
from ._clock import UNITS, Clock
from ._proxy import BoundOptimizer, flush_views
from ._rollback import unchanged_on_error
from ._targets import Target, parse_target

_RAW_LR = parse_target("lr")  # what a raw torch scheduler drives


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class SynchronousSchedule(LRScheduler):
    """Steps several schedules of one optimizer together, and reads any of them back.

    Each member is named by what it drives: its ``schedule_target`` (``"weight_decay"``,
    ``"betas[0]"``) if built by :func:`arbitrary_schedule_factory`, ``"lr"`` for a raw
    torch scheduler.

    Args:
        schedules: the member schedulers, all on the same optimizer, one per name.
        clock: the training clock (docs/clock.md). With one, :meth:`step` brings each
            member to the clock's reading in its own unit, so members may count samples
            or tokens; without one, every member counts optimizer steps.

    Example:
        >>> import torch, schedany
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=1.0)
        >>> schedule = schedany.SynchronousSchedule([
        ...     schedany.linear_schedule_with_warmup(opt, 1.0, 0.0, 2, 4),
        ...     schedany.constant_schedule(opt, 0.5, schedule_target="weight_decay"),
        ... ])
        >>> for _ in range(3):
        ...     opt.step(); schedule.step()
        ...     print(schedule.get_last_lr(), schedule.get_last_schedule("weight_decay"))
        [0.5] [0.5]
        [1.0] [0.5]
        [0.5] [0.5]
    """

    def __init__(  # noqa: D107
        self, schedules: Sequence[LRScheduler], clock: Clock | None = None
    ) -> None:
        # LRScheduler.__init__ is not called: it would write initial_lr into the
        # user's param_groups and take a step of its own.
        if isinstance(schedules, LRScheduler) or not isinstance(schedules, Sequence):
            raise TypeError(
                f"SynchronousSchedule takes a list of schedulers, got {type(schedules).__name__}"
            )
        if not schedules:
            raise ValueError("SynchronousSchedule needs at least one schedule, got an empty list")
        optimizer = real_optimizer(schedules[0]) if isinstance(schedules[0], LRScheduler) else None
        members: dict[str, LRScheduler] = {}
        targets: dict[str, Target] = {}
        # (member, position of its unit in the clock's counts, every, closed form?) of
        # the members that step without a metric, fixed here so step() only reads them.
        stepped: list[tuple[LRScheduler, int, int, bool]] = []
        plateau: list[ReduceLROnPlateau] = []
        for i, schedule in enumerate(schedules):
            if isinstance(schedule, SynchronousSchedule) or not isinstance(schedule, LRScheduler):
                raise TypeError(
                    f"schedules[{i}] must be a torch LRScheduler (not a SynchronousSchedule), "
                    f"got {type(schedule).__name__}"
                )
            if real_optimizer(schedule) is not optimizer:
                raise ValueError(
                    f"schedules[{i}] ({type(schedule).__name__}) drives a different optimizer "
                    f"than schedules[0]; a SynchronousSchedule coordinates one optimizer"
                )
            target = bound_target(schedule) or _RAW_LR
            if target.name in members:
                raise ValueError(
                    f"two schedules drive {target.name!r} "
                    f"(schedules[{list(members).index(target.name)}] "
                    f"and schedules[{i}]); give each name one schedule"
                )
            unit, every = bound_unit(schedule)
            if clock is None and (unit, every) != ("steps", 1):
                raise ValueError(
                    f"schedules[{i}] ({target.name!r}) steps once per {every} {unit}, which "
                    "needs the training clock: SynchronousSchedule(schedules, clock=Clock())"
                )
            if isinstance(schedule, ReduceLROnPlateau) and unit != "steps":
                raise ValueError(
                    f"schedules[{i}] ({target.name!r}) is a ReduceLROnPlateau, which steps "
                    f"once per metric; it cannot count {unit}"
                )
            members[target.name] = schedule
            targets[target.name] = target
            if isinstance(schedule, ReduceLROnPlateau):
                plateau.append(schedule)
            else:
                closed_form = isinstance(schedule, LambdaLR)
                stepped.append((schedule, UNITS.index(unit), every, closed_form))
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"SynchronousSchedule: clock must be a Clock, got {clock!r}")
        self.clock = clock
        self._counts = None if clock is None else clock._counts  # read in place each step
        self.optimizer = optimizer
        self._schedules = members
        self._targets = targets
        self._num_groups = len(optimizer.param_groups)
        self._plateau = plateau
        self._stepped = stepped
        # The bound members' proxies. From the coordinator's first step() on, it refreshes
        # their views before a step and writes their values to the optimizer after it, one
        # pass each (BoundOptimizer.defer_writes). Not before: a coordinator built only to
        # read members that something else steps (the HF Trainer, Lightning) must leave
        # them writing through.
        self._proxies = [s.optimizer for s in members.values() if bound_target(s) is not None]
        self._writes_deferred = False
        self.last_epoch = 0

    @property
    def schedules(self) -> dict[str, LRScheduler]:
        """The members by name (a copy; the coordinator's own mapping stays fixed)."""
        return dict(self._schedules)

    @property
    def schedule_names(self) -> list[str]:
        return list(self._schedules)

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Step every member once, or, with a clock, to the clock's reading in its own
        unit. A metric (``step(val_loss)``) goes only to the ReduceLROnPlateau members;
        the others always step without arguments."""
        if len(self.optimizer.param_groups) != self._num_groups:
            raise RuntimeError(
                f"SynchronousSchedule: the optimizer had {self._num_groups} param groups when "
                f"the schedule was built and has {len(self.optimizer.param_groups)} now; "
                "rebuild the schedule after add_param_group()"
            )
        if self._plateau and not (args or kwargs):
            names = [n for n, s in self._schedules.items() if isinstance(s, ReduceLROnPlateau)]
            raise TypeError(
                f"SynchronousSchedule.step() needs a metric for its ReduceLROnPlateau "
                f"schedule(s) {names}: call step(metric)"
            )
        proxies = self._proxies
        if not self._writes_deferred:
            for proxy in proxies:
                proxy.defer_writes()
            self._writes_deferred = True
        for proxy in proxies:
            if proxy.stale:  # the optimizer stepped or loaded since: re-read the targets
                proxy.refresh()
        try:
            counts = self._counts
            if counts is None:
                for schedule, _position, _every, _closed_form in self._stepped:
                    schedule.step()
            else:
                for schedule, position, every, closed_form in self._stepped:
                    reading = counts[position] if every == 1 else counts[position] // every
                    if closed_form and reading > schedule.last_epoch:
                        # A LambdaLR is a closed form of last_epoch: jump there in one
                        # step (a token unit may advance by thousands per optimizer step).
                        schedule.last_epoch = reading - 1
                        schedule.step()
                    elif reading != schedule.last_epoch:
                        self._catch_up(schedule, reading - schedule.last_epoch)
            for schedule in self._plateau:
                schedule.step(*args, **kwargs)
        finally:  # what the members did reaches the optimizer, even if one failed
            flush_views(proxies)
        self.last_epoch += 1

    def _catch_up(self, schedule: LRScheduler, behind: int) -> None:
        """``behind`` steps of a member that is not a closed form; an error if negative.
        (:meth:`step` takes the common cases itself.)"""
        if behind < 0:
            (name,) = [n for n, s in self._schedules.items() if s is schedule]
            unit, every = bound_unit(schedule)
            raise ValueError(
                f"schedule {name!r} has taken {schedule.last_epoch} steps of {every} {unit}, "
                f"but the clock reads {self.clock.read(unit)} {unit}: the clock went backwards"
            )
        for _ in range(behind):
            schedule.step()

    def get_last_schedule(self, name: str) -> list[float]:
        """The last value of schedule ``name``, one per param group."""
        return [_as_float(v) for v in self._member(name).get_last_lr()]

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        if "lr" in self._schedules:
            return self.get_last_schedule("lr")
        return [_as_float(group["lr"]) for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        """Each member's own state, its proxy bookkeeping, and the values it had set."""
        state = {
            "last_epoch": self.last_epoch,
            "schedules": {name: self._member_state(name) for name in self._schedules},
        }
        if self.clock is not None:
            state["clock"] = self.clock.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Strict: the saved names must equal this coordinator's names. Every scheduled
        key in the optimizer is rewritten to the value it had when saved."""
        for field in ("last_epoch", "schedules"):
            if field not in state_dict:
                raise KeyError(
                    f"SynchronousSchedule state_dict has no {field!r} entry (got "
                    f"{sorted(state_dict)})"
                )
        if ("clock" in state_dict) != (self.clock is not None):
            saved_clock = "holds a clock" if "clock" in state_dict else "has no clock"
            own_clock = "has one" if self.clock is not None else "has none"
            raise KeyError(
                f"SynchronousSchedule.load_state_dict: the state {saved_clock}, this "
                f"schedule {own_clock}; build it with the same clock= as the saved one"
            )
        saved = state_dict["schedules"]
        missing = [name for name in self._schedules if name not in saved]
        unknown = [name for name in saved if name not in self._schedules]
        if missing or unknown:
            raise KeyError(
                f"SynchronousSchedule.load_state_dict: names do not match; missing from the "
                f"state: {missing}, unknown in the state: {unknown} (this schedule has "
                f"{self.schedule_names})"
            )
        groups = self.optimizer.param_groups
        for name, member in saved.items():
            if len(member["values"]) != len(groups):
                raise ValueError(
                    f"schedule {name!r} was saved with {len(member['values'])} param groups, "
                    f"the optimizer has {len(groups)}"
                )
        # A member can still fail half-way (a corrupt entry, a scheduler class that
        # changed since saving): undo the members already loaded, so nothing is lost.
        members_before = copy.deepcopy({name: self._member_state(name) for name in saved})
        clock_before = None if self.clock is None else self.clock.state_dict()
        with unchanged_on_error(self.optimizer):
            try:
                last_epoch = int(state_dict["last_epoch"])
                if self.clock is not None:
                    self.clock.load_state_dict(state_dict["clock"])
                self._load_members(saved)
            except BaseException:
                self._load_members(members_before, write_values=False)
                if self.clock is not None and clock_before is not None:
                    self.clock.load_state_dict(clock_before)
                raise
        self.last_epoch = last_epoch

    def _load_members(self, saved: dict[str, Any], write_values: bool = True) -> None:
        groups = self.optimizer.param_groups
        for name, member in saved.items():
            schedule = self._schedules[name]
            schedule.load_state_dict(member["scheduler"])
            if isinstance(schedule.optimizer, BoundOptimizer):
                schedule.optimizer.load_bookkeeping(member["bookkeeping"])
            if not write_values:
                continue
            target = self._targets[name]
            for group, value in zip(groups, member["values"]):
                current = target.read(group)
                if isinstance(current, Tensor):
                    current.fill_(value)
                else:
                    target.write(group, value)

    def _member(self, name: str) -> LRScheduler:
        try:
            return self._schedules[name]
        except KeyError:
            raise KeyError(
                f"no schedule named {name!r}; this schedule has {self.schedule_names}"
            ) from None

    def _member_state(self, name: str) -> dict[str, Any]:
        schedule = self._schedules[name]
        target = self._targets[name]
        proxy = schedule.optimizer
        return {
            "scheduler": schedule.state_dict(),
            "bookkeeping": proxy.bookkeeping_state() if isinstance(proxy, BoundOptimizer) else None,
            "values": [_as_float(target.read(group)) for group in self.optimizer.param_groups],
        }

    def __repr__(self) -> str:
        members = ", ".join(f"{n}: {type(s).__name__}" for n, s in self._schedules.items())
        return f"SynchronousSchedule({{{members}}})"
