"""``schedany preview``: every scheduled value of a train config, without training.

The schedule is stepped on a throwaway optimizer that
:func:`schedany.config.build_run` builds exactly as the trainer does (same param
groups, same keys, ``extend`` applied), so the numbers are the ones a real run logs.

Step convention (the reference trainer's): step ``s`` (``1 <= s <= steps``) is the
``s``-th optimizer step, and its value is the one that step used — what the schedule
holds after ``s - 1`` calls of ``schedule.step()``. TensorBoard tags and
``metrics.jsonl`` of a real run use the same ``s``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ._clock import Clock, Unit, check_unit
from ._record import StepRecord, group_labels, schedule_tags
from .config import ConfigError, TrainConfig, build_run, load_config
from .config.parsing import check_int
from .errors import check_integer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ScheduleTrace", "format_table", "plot_trace", "preview_command", "table_steps", "trace"]

_PANEL_HEIGHT_IN = 2.0
_FIGURE_WIDTH_IN = 8.0
_MARGIN_IN = 0.9
DPI = 100
_LINE_STYLES = ("-", "--", ":", "-.")
FULL_TABLE_STEPS = 30
"""Up to this many steps the table shows every step; beyond, :data:`TABLE_ROWS` of them."""
TABLE_ROWS = 21


class ScheduleTrace(NamedTuple):
    """Every scheduled value: ``values[key][s - 1][g]`` is the value of ``key`` in param
    group ``g`` (labelled ``groups[g]``) used by point ``s``: optimizer step ``s``, or with
    another ``unit`` the span that ends at ``axis[s - 1]`` of that unit."""

    groups: list[str]
    values: dict[str, list[list[float]]]
    unit: Unit = "steps"
    """What the x axis counts."""
    axis: tuple[int, ...] = ()
    """The clock's reading in ``unit`` at the end of each point (the x a run logs it at)."""

    @property
    def steps(self) -> int:
        return len(next(iter(self.values.values()), []))


StepSamples = Callable[[list[dict[str, Any]]], int]
"""The samples one optimizer step takes, from the param groups holding its values."""


def _step_samples(config: TrainConfig) -> StepSamples | None:
    """How many samples one optimizer step takes, where the config fixes it (one
    process): the micro-batch without a controller; with a logical batch counted in
    samples, the whole micro-batches that reach the step's target (the controller's
    rule). Never tokens, and nothing under GNTS: those depend on the data."""
    micro = config.train.micro_batch_size
    control = config.control
    if control.kind == "none":
        return lambda groups: micro
    if control.kind == "logical_batch" and control.items == "samples":
        key = config.control_key()
        assert key is not None

        def logical_batch(groups: list[dict[str, Any]]) -> int:
            target = max(group[key] for group in groups if key in group)
            return max(1, math.ceil(target / micro)) * micro

        return logical_batch
    return None


class _Plan(NamedTuple):
    points: int | None
    """How many points; None: optimizer steps until the clock reaches the budget."""
    span: int
    """The units of ``unit`` one point spans, when points are not optimizer steps."""
    stepwise: bool
    """Points are optimizer steps (every schedule's unit converts to steps)."""
    step_samples: StepSamples | None


def _plan(config: TrainConfig, unit: Unit, count: int | None) -> _Plan:
    """The points of a trace in ``unit``, or a ConfigError naming what the config does
    not fix."""
    step_samples = _step_samples(config)
    fixed = {"steps", "samples"} if step_samples is not None else {"steps"}
    stepwise = unit in fixed
    for name, spec in config.schedules.items():
        if not (spec.unit == unit or (stepwise and spec.unit in fixed)):
            raise ConfigError(
                f"schedules.{name}.unit",
                f"counts {spec.unit}, and the config does not fix how many {spec.unit} make "
                f"one of the {unit} the preview counts (--unit {unit}); preview it with "
                f"--unit {spec.unit}, or see it against clock/{spec.unit} in a run",
            )
    budget_unit, budget = config.train.budget()
    if stepwise:
        if count is None and budget_unit not in fixed:
            raise ConfigError(
                f"train.{budget_unit}", "preview counts optimizer steps here; pass --steps N"
            )
        if count is None and budget_unit == "steps":
            count = budget
        return _Plan(count, 0, True, step_samples)  # None: up to the samples budget
    if budget_unit != unit:
        raise ConfigError(
            f"train.{budget_unit}",
            f"preview --unit {unit} spans a train.{unit} budget, and this config's budget "
            f"is in {budget_unit}",
        )
    count = count or min(budget, 200)
    return _Plan(count, -(-budget // count), False, None)


def trace(
    config: TrainConfig,
    steps: int | None = None,
    *,
    tensorboard: str | None = None,
    unit: Unit = "steps",
) -> ScheduleTrace:
    """Every scheduled value the job would use, on a throwaway optimizer, without
    training; optionally written to TensorBoard under ``tensorboard`` with the tags (and
    the x axis, ``train.axis: unit``) a real run uses.

    ``unit="steps"``: ``steps`` optimizer steps (default: the budget). Another unit: the
    x axis counts it, and every schedule must be placeable on it. A schedule in a unit
    whose conversion the config does not fix (tokens per step; steps under a controller)
    is a :class:`~schedany.config.ConfigError` naming it and both units. Without a fixed
    conversion the points split the budget into ``steps`` (default up to 200) spans.
    """
    unit = check_unit(unit, "trace")
    if steps is not None:
        steps = check_integer(steps, "steps", min=1, func="trace")
    plan = _plan(config, unit, steps)
    budget_unit, budget = config.train.budget()
    clock = Clock()
    optimizer, schedule = build_run(config, clock=clock)
    tags = schedule_tags(schedule)
    logger = None
    if tensorboard is not None:
        from .integrations.tensorboard import ScheduleLogger

        # purge_step=1: previewing into the same folder again replaces the old curves.
        logger = ScheduleLogger(schedule, log_dir=tensorboard, purge_step=1)
    names = schedule.schedule_names
    values: dict[str, list[list[float]]] = {name: [] for name in names}
    axis = []
    try:
        while len(axis) < plan.points if plan.points else clock.read(budget_unit) < budget:
            optimizer.step()  # no gradients, nothing changes: it keeps torch's order check happy
            if plan.stepwise:  # one optimizer step, of the data the config fixes
                samples = plan.step_samples(optimizer.param_groups) if plan.step_samples else 0
                clock.advance(samples=samples)
            else:  # a span of `unit`; every schedule counts `unit`, so the step count is moot
                clock.advance(**{unit: plan.span})
            record = dataclasses.replace(StepRecord.read(schedule), clock=None)
            for name in names:
                values[name].append(record.schedule[name])
            axis.append(clock.read(unit))
            if logger is not None:
                logger.log_scalars(axis[-1], record.scalars(tags))
            schedule.step()
    finally:
        if logger is not None:
            logger.close()
    return ScheduleTrace(group_labels(optimizer.param_groups), values, unit, tuple(axis))


def _x_label(result: ScheduleTrace) -> str:
    return "step" if result.unit == "steps" else result.unit


def table_steps(steps: int) -> list[int]:
    """Every step up to :data:`FULL_TABLE_STEPS`; else about :data:`TABLE_ROWS` evenly
    spaced ones, the first and the last included."""
    if steps <= FULL_TABLE_STEPS:
        return list(range(1, steps + 1))
    return sorted({1 + round(i * (steps - 1) / (TABLE_ROWS - 1)) for i in range(TABLE_ROWS)})


def format_table(result: ScheduleTrace, steps: Sequence[int] | None = None) -> str:
    """One row per step, one column per ``key/group``; values to 6 significant digits."""
    steps = table_steps(result.steps) if steps is None else steps
    columns = [(key, g) for key in result.values for g in range(len(result.groups))]
    header = [_x_label(result)] + [f"{key}/{result.groups[g]}" for key, g in columns]
    x = result.axis or range(1, result.steps + 1)
    rows = [
        [str(x[s - 1])] + [f"{result.values[key][s - 1][g]:.6g}" for key, g in columns]
        for s in steps
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def plot_trace(result: ScheduleTrace, title: str = "") -> Figure:
    """One panel per scheduled key, one line per param group, sharing the step axis.

    The figure is ``8 x (0.9 + 2 * keys)`` inches; at :data:`DPI` that is the PNG size.
    Built on :class:`matplotlib.figure.Figure`, so no pyplot state or GUI backend is
    involved (plain Agg rendering).
    """
    from matplotlib.figure import Figure

    keys = list(result.values)
    fig = Figure(figsize=(_FIGURE_WIDTH_IN, _MARGIN_IN + _PANEL_HEIGHT_IN * len(keys)), dpi=DPI)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    x = list(result.axis or range(1, result.steps + 1))
    for ax, key in zip(axes, keys):
        for g, label in enumerate(result.groups):
            # Groups often share a curve; a line style per group keeps each one visible.
            style = _LINE_STYLES[g % len(_LINE_STYLES)]
            ax.plot(x, [row[g] for row in result.values[key]], style, label=label, linewidth=1.5)
        ax.set_title(key, loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        if len(result.groups) > 1:
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("optimizer step" if result.unit == "steps" else result.unit)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def preview_command(
    config_path: str,
    output: str | None,
    steps: int | None,
    tensorboard: str | None,
    overrides: list[str],
    unit: Unit = "steps",
) -> int:
    """``schedany preview CONFIG [-o FILE.png] [--steps N] [--unit U] [--tensorboard DIR]
    [--set k=v]``.

    Plots one panel per key to ``output`` (any format matplotlib writes, by suffix),
    else prints a compact table; ``tensorboard`` also writes the curves there. Returns
    the exit code; a bad config or argument raises :class:`~schedany.config.ConfigError`.
    """
    config = load_config(config_path, overrides)
    if steps is not None:
        check_int(steps, "--steps", min=1)
    if output is not None:
        formats = _image_formats()
        if formats is None:
            print(
                "schedany preview: error: -o needs matplotlib: pip install 'schedany[plot]'",
                file=sys.stderr,
            )
            return 1
        if Path(output).suffix.lower().lstrip(".") not in formats:
            raise ConfigError(
                "--output",
                f"expected a file ending in .png (or .{', .'.join(sorted(formats))}), "
                f"got {output!r}",
            )
    result = trace(config, steps, tensorboard=tensorboard, unit=unit)
    if unit == "steps":
        where = f"{config_path}: {result.steps} optimizer steps"
        what = "the value each step used (step s: after s-1 schedule steps)"
    else:
        where = f"{config_path}: {result.axis[-1]} {unit} in {result.steps} spans"
        what = f"the value each span used, by the {unit} at its end"
    if output is None:
        print(f"{where}; {what}")
        print(format_table(result))
    else:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_trace(result, title=where).savefig(path)
        print(f"wrote {path} ({len(result.values)} panels: {', '.join(result.values)})")
    if tensorboard is not None:
        print(f"wrote TensorBoard curves to {tensorboard} (tensorboard --logdir {tensorboard})")
    return 0


def _image_formats() -> dict[str, str] | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    return FigureCanvasAgg.get_supported_filetypes()
