"""The schedule spec (``docs/api.md``): ``extend`` + ``schedules`` -> a SynchronousSchedule,
and a train config's optimizer with its schedule (:func:`build_run`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch.optim.lr_scheduler as lr_scheduler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .._binding import BoundOptimizer, arbitrary_schedule_factory
from .._builtins import bind_curve
from .._clock import Clock
from .._optimizer_utils import extend_optimizer
from .._rollback import unchanged_on_error
from .._synchronous import SynchronousSchedule
from ..curves import BUILTIN_CURVES, Curve
from ..errors import ArgumentError, TargetError, is_real
from ._optimizer import make_optimizer, placeholder_groups
from ._schema import ScheduleSpec, TrainConfig
from ._spec import REGISTRY, parse_schedules
from .parsing import (
    ConfigError,
    as_mapping,
    check_number,
    from_argument_error,
    read_yaml,
    show,
    unknown_key,
)

_NEW_KEY_HINT = "Declare a new key under `extend:`."


def parse_extend(data: Any, path: str = "extend") -> dict[str, float]:
    data = as_mapping(data, path, "a mapping of new optimizer key -> initial value")
    out = {}
    for key, value in data.items():
        if key == "params" or "[" in key or "]" in key:
            raise ConfigError(
                f"{path}.{key}", "expected a plain new key such as gradient_norm_threshold"
            )
        out[key] = check_number(value, f"{path}.{key}")
    return out


def _build_one(optimizer: Optimizer, spec: ScheduleSpec, path: str) -> LRScheduler:
    """Build one member; the library's typed errors become ConfigErrors at ``path``."""
    try:
        return _construct(optimizer, spec, path)
    except TargetError as error:
        hint = _NEW_KEY_HINT if error.missing_key is not None else error.hint
        raise ConfigError(path, f"{error.problem} {hint}".rstrip()) from None
    except ArgumentError as error:
        raise from_argument_error(f"{path}.{error.argument}", error) from None
    except (KeyError, TypeError, ValueError) as error:  # a torch scheduler's own check
        message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
        raise ConfigError(path, message) from None


def _construct(optimizer: Optimizer, spec: ScheduleSpec, path: str) -> LRScheduler:
    if spec.kind == "curve":
        if spec.name in BUILTIN_CURVES:
            curve = BUILTIN_CURVES[spec.name](**spec.args)
        else:
            curve = _registered_curve(spec, path)
        return bind_curve(optimizer, curve, spec.target, unit=spec.unit)
    cls = getattr(lr_scheduler, spec.name)
    return arbitrary_schedule_factory(
        optimizer,
        lambda proxy: cls(proxy, **spec.args),
        schedule_target=spec.target,
        unit=spec.unit,
        every=spec.every,
    )


def _registered_curve(spec: ScheduleSpec, path: str) -> Curve:
    curve = REGISTRY[spec.name](**spec.args)
    if not callable(curve):
        raise ConfigError(
            path,
            f"registered curve {spec.name!r} returned {curve!r}, not a function t -> multiplier",
        )
    first = curve(0)
    if not is_real(first) or not math.isfinite(first):
        raise ConfigError(
            path, f"curve {spec.name!r} gave {show(first)} at t=0; expected a finite number"
        )
    return curve


def _apply_extend(optimizer: Optimizer, extend: Mapping[str, float], path: str) -> None:
    for key, value in extend.items():
        for i, group in enumerate(optimizer.param_groups):
            if key in group and group[key] != value:
                raise ConfigError(
                    f"{path}.{key}",
                    f"the optimizer already has this key (param_groups[{i}] "
                    f"holds {show(group[key])}); set it in the optimizer block, or schedule it",
                )
        extend_optimizer(optimizer, key, value)


def build_schedule(
    optimizer: Optimizer,
    spec: Mapping[str, Any] | TrainConfig | str | os.PathLike[str],
    *,
    clock: Clock | None = None,
) -> SynchronousSchedule:
    """Build the SynchronousSchedule that a spec describes (``docs/api.md``).

    Args:
        optimizer: the real optimizer. Keys in ``extend`` are added to it first.
        spec: a mapping with ``schedules`` (and optionally ``extend``), a path to a YAML
            file holding one, or a loaded :class:`TrainConfig`.
        clock: the training clock the schedule follows; needed when an entry's ``unit``
            is ``samples`` or ``tokens`` (or ``every`` is not 1), see docs/clock.md.

    Raises:
        ConfigError: naming the dotted path, e.g. ``schedules.lr.num_warmup_steps:
            expected an integer >= 0, got -5``. The optimizer is then left as it was.

    Example:
        >>> import torch
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> schedule = build_schedule(opt, {
        ...     "extend": {"gradient_norm_threshold": 2.0},
        ...     "schedules": {
        ...         "lr": {"curve": "linear_schedule_with_warmup", "warmup_to_value": 1.0,
        ...                "anneal_to_value": 0.0, "num_warmup_steps": 2,
        ...                "num_training_steps": 4},
        ...         "gradient_norm_threshold": {"scheduler": "StepLR", "step_size": 1,
        ...                                     "gamma": 0.5}}})
        >>> for _ in range(2):
        ...     opt.step(); schedule.step()
        ...     print(schedule.get_last_lr(), schedule.get_last_schedule("gradient_norm_threshold"))
        [0.5] [1.0]
        [1.0] [0.5]
    """
    if isinstance(spec, TrainConfig):
        extend, schedules = spec.extend, spec.schedules
    else:
        if isinstance(spec, (str, os.PathLike)):
            spec = read_yaml(spec)
        data = as_mapping(spec, "", "a mapping with `schedules` (and optionally `extend`)")
        for key in data:
            if key not in ("extend", "schedules"):
                raise unknown_key("", key, ["extend", "schedules"], "block")
        extend = parse_extend(data.get("extend"))
        schedules = parse_schedules(data.get("schedules"))
    if not isinstance(optimizer, Optimizer) or isinstance(optimizer, BoundOptimizer):
        raise TypeError(
            f"build_schedule: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if clock is None:
        for target, entry in schedules.items():
            if (entry.unit, entry.every) != ("steps", 1):
                where = "unit" if entry.unit != "steps" else "every"
                raise ConfigError(
                    f"schedules.{target}.{where}",
                    f"a schedule counting {entry.every} {entry.unit} per step needs the "
                    "training clock (build_schedule(..., clock=Clock()))",
                )
    built: list[LRScheduler] = []
    with unchanged_on_error(optimizer):
        try:
            _apply_extend(optimizer, extend, "extend")
            for target, entry in schedules.items():
                built.append(_build_one(optimizer, entry, f"schedules.{target}"))
            return SynchronousSchedule(built, clock=clock)
        except BaseException:
            for scheduler in built:
                if isinstance(scheduler.optimizer, BoundOptimizer):
                    scheduler.optimizer.detach()
            raise


class Run(NamedTuple):
    """What a train config builds before any training: the optimizer and its schedule."""

    optimizer: Optimizer
    schedule: SynchronousSchedule


def build_run(
    config: TrainConfig,
    param_groups: Sequence[dict[str, Any]] | None = None,
    *,
    clock: Clock | None = None,
) -> Run:
    """The config's optimizer over ``param_groups`` (dicts with ``params`` and maybe a
    ``name``: ``decay`` / ``no_decay``) and its schedule, ``extend`` applied.

    ``param_groups=None`` uses one placeholder parameter per group, shaped like the job's
    groups: enough for every scheduled value (``schedany validate`` and ``preview``).
    """
    groups = placeholder_groups(config.optimizer) if param_groups is None else param_groups
    optimizer = make_optimizer(config.optimizer, groups)
    return Run(optimizer, build_schedule(optimizer, config, clock=clock))
