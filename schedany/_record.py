"""The step record: what one optimizer step used, under the names every output shows.

Names (docs/inspecting_schedules.md, "During training"):

- ``schedule/<key>/<group>`` for every scheduled key and param group; ``<group>`` is the
  group's ``name`` entry if it has one, else ``pg<i>``;
- ``control/<metric>`` for every entry of the controller's ``metrics()``;
- ``guard/<metric>`` for every entry of the gradient guard's ``metrics()``;
- ``clock/steps``, ``clock/samples``, ``clock/tokens`` when the schedule has a clock.

The reference trainer reads one :class:`StepRecord` per optimizer step, and its
TensorBoard events, Tune reports, console and ``metrics.jsonl`` are all written from
it; ``ScheduleLogger``, ``ray_tune.report`` and ``schedany preview`` name values the
same way because they use these functions too.

It lives in the core, not in the TensorBoard integration, because the names are the
library's contract, not TensorBoard's: Tune and the console need them without
TensorBoard installed. It is not a method of :class:`~schedany.SynchronousSchedule`
because the record also holds the controller's metrics, which the schedule knows
nothing about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._synchronous import SynchronousSchedule


class Controller(Protocol):
    """What the record reads from a controller (LogicalBatchSize, GradientNormThreshold)
    or a guard (GradientGuard)."""

    def metrics(self) -> Mapping[str, float]: ...


def group_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``<group>`` part of the names: each group's ``name`` entry, else ``pg<i>``.

    Raises ``ValueError`` when two groups get the same label (their curves would
    merge into one zig-zagging line).
    """
    labels = [
        str(g["name"]) if g.get("name") is not None else f"pg{i}"
        for i, g in enumerate(param_groups)
    ]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise ValueError(
                f"param_groups[{seen[label]}] and param_groups[{i}] both log as {label!r}; "
                f"give the groups distinct 'name' entries"
            )
        seen[label] = i
    return labels


def schedule_tags(schedule: SynchronousSchedule) -> dict[str, list[str]]:
    """``{key: ["schedule/<key>/<group>", ...]}``, keys in schedule order, groups in
    param-group order. Raises ``ValueError`` as :func:`group_labels` does."""
    labels = group_labels(schedule.optimizer.param_groups)
    return {key: [f"schedule/{key}/{label}" for label in labels] for key in schedule.schedule_names}


@dataclass(frozen=True)
class StepRecord:
    """Every scheduled value and the controller's metrics at one moment.

    Read it after ``optimizer.step()`` and before ``schedule.step()``: it then holds the
    values that optimizer step used.
    """

    schedule: dict[str, list[float]]
    """``schedule[key][g]``: the value of ``key`` in param group ``g``."""
    control: dict[str, float] | None
    """``controller.metrics()``, or None without a controller."""
    clock: dict[str, int] | None = None
    """The schedule's clock (steps, samples, tokens so far), or None without one."""
    guard: dict[str, float] | None = None
    """``GradientGuard.metrics()``, or None without a guard."""

    @classmethod
    def read(
        cls,
        schedule: SynchronousSchedule,
        controller: Controller | None = None,
        metrics: Mapping[str, float] | None = None,
        guard: Controller | None = None,
    ) -> StepRecord:
        """``metrics``: the controller's ``metrics()`` if the caller has just read them;
        ``guard``: a :class:`~schedany.GradientGuard` whose ``metrics()`` to record."""
        values = {key: schedule.get_last_schedule(key) for key in schedule.schedule_names}
        if controller is not None and metrics is None:
            metrics = controller.metrics()
        control = None if controller is None else dict(metrics)
        clock = None if schedule.clock is None else schedule.clock.state_dict()
        return cls(values, control, clock, None if guard is None else dict(guard.metrics()))

    def scalars(self, tags: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """The record under its names: ``schedule/<key>/<group>`` in the order of
        ``tags`` (from :func:`schedule_tags`), then ``control/<metric>``, then
        ``clock/<unit>``, then ``guard/<metric>``."""
        out = {
            tag: float(value)
            for key, key_tags in tags.items()
            for tag, value in zip(key_tags, self.schedule[key], strict=True)
        }
        if self.control is not None:
            out.update({f"control/{name}": float(v) for name, v in self.control.items()})
        if self.clock is not None:
            out.update({f"clock/{unit}": float(n) for unit, n in self.clock.items()})
        if self.guard is not None:
            out.update({f"guard/{name}": float(v) for name, v in self.guard.items()})
        return out
