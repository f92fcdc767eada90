"""The schedule spec (``docs/api.md``): ``extend`` + ``schedules`` -> a SynchronousSchedule.

Nothing named in a spec is imported by path: ``curve:`` names a built-in schedule or
a curve registered from Python with :func:`register_curve`; ``scheduler:`` names a
class of ``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch.optim.lr_scheduler as lr_scheduler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .._binding import BoundOptimizer, arbitrary_schedule_factory
from .._builtins import bind_curve
from .._optimizer_utils import extend_optimizer
from .._rollback import unchanged_on_error
from .._synchronous import SynchronousSchedule
from .._targets import parse_target
from ..curves import BUILTIN_CURVES, Curve
from ..errors import ArgumentError, TargetError, is_integer, is_real
from ._optimizer import make_optimizer, placeholder_groups
from ._schema import ScheduleSpec, TrainConfig
from .parsing import (
    ConfigError,
    as_mapping,
    check_int,
    check_number,
    did_you_mean,
    expected,
    from_argument_error,
    read_yaml,
    show,
    unknown_key,
)

CurveFactory = Callable[..., Curve]

_REGISTRY: dict[str, CurveFactory] = {}
_NEW_KEY_HINT = "Declare a new key under `extend:`."
_BOUND_ARGS = ("optimizer", "schedule_target", "default_value")
# Classes whose arguments are callables or other schedulers, which a file cannot hold.
_NOT_FROM_A_FILE = {
    "LRScheduler": "it is the abstract base class",
    "LambdaLR": "it takes a Python function; register a curve with "
    "schedany.config.register_curve() and use `curve:`",
    "MultiplicativeLR": "it takes a Python function; register a curve with "
    "schedany.config.register_curve() and use `curve:`",
    "SequentialLR": "it takes other schedulers; use a curve with a warmup phase, or "
    "register a curve",
    "ChainedScheduler": "it takes other schedulers; give each key its own schedule",
}


def register_curve(name: str, factory: CurveFactory, *, overwrite: bool = False) -> None:
    """Make ``curve: name`` available to schedule specs.

    ``factory(**args)`` receives the spec entry's other fields and returns a curve
    ``t -> multiplier`` (``value(t) = initial_value * curve(t)``, run by a ``LambdaLR``).
    Its signature is checked against the entry, so a misspelt field is an error.

    >>> register_curve("halving", lambda every: lambda t: 0.5 ** (t // every))
    >>> "halving" in curve_names()
    True
    >>> unregister_curve("halving")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_curve: name must be an identifier, got {name!r}")
    if name in BUILTIN_CURVES:
        raise ValueError(f"register_curve: {name!r} is a built-in schedule and cannot be replaced")
    if not callable(factory):
        raise TypeError(f"register_curve: factory must be callable, got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_curve: {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = factory


def unregister_curve(name: str) -> None:
    """Remove a curve added with :func:`register_curve` (``KeyError`` if absent)."""
    try:
        del _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unregister_curve: no registered curve {name!r}") from None


def curve_names() -> list[str]:
    """The built-in schedule names, then the registered curves."""
    return [*BUILTIN_CURVES, *_REGISTRY]


def _scheduler_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(lr_scheduler).items()
        if inspect.isclass(obj)
        and issubclass(obj, (LRScheduler, ReduceLROnPlateau))
        and not name.startswith("_")
        and name not in _NOT_FROM_A_FILE
    )


def _check_signature(
    func: Callable[..., Any], args: Mapping[str, Any], path: str, what: str, skip: tuple[str, ...]
) -> dict[str, inspect.Parameter]:
    """Refuse unknown, missing and schedany-owned arguments; returns the settable ones."""
    signature = inspect.signature(func).parameters
    params = {
        n: p
        for n, p in signature.items()
        if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.values())
    for key in args:
        if key in skip:
            raise ConfigError(f"{path}.{key}", f"is set by schedany, not by the spec ({what})")
        if key not in params and not takes_any:
            raise unknown_key(path, key, params, f"argument of {what}")
    for n, p in params.items():
        if p.default is p.empty and n not in args:
            raise ConfigError(f"{path}.{n}", f"required by {what} but missing")
    return params


def parse_schedules(data: Any, path: str = "schedules") -> dict[str, ScheduleSpec]:
    """Check every entry's shape, names and argument types (no optimizer needed)."""
    data = as_mapping(data, path, "a mapping of target key -> schedule")
    if not data:
        raise expected(path, "at least one schedule (target key -> schedule)", data)
    specs = {}
    for target, entry in data.items():
        where = f"{path}.{target}"
        try:
            parse_target(target, where)
        except TargetError as error:
            raise ConfigError(where, error.problem) from None
        specs[target] = _parse_entry(target, entry, where)
    return specs


def _parse_entry(target: str, entry: Any, path: str) -> ScheduleSpec:
    entry = as_mapping(entry, path, "a mapping with `curve:` or `scheduler:`")
    kinds = [k for k in ("curve", "scheduler") if k in entry]
    if len(kinds) != 1:
        raise ConfigError(
            path,
            "expected exactly one of `curve:` (a built-in or registered curve) or "
            f"`scheduler:` (a torch.optim.lr_scheduler class), got keys {sorted(entry)}",
        )
    kind = kinds[0]
    name = entry[kind]
    args = {k: v for k, v in entry.items() if k != kind}
    if kind == "curve":
        if not isinstance(name, str) or name not in curve_names():
            raise _unknown_name(
                f"{path}.curve", name, curve_names(), "a built-in or registered curve"
            )
        if name in BUILTIN_CURVES:
            _check_signature(BUILTIN_CURVES[name], args, path, f"curve {name!r}", _BOUND_ARGS)
            _builtin_curve(name, args, path)  # the curve checks its own arguments
        else:
            _check_signature(_REGISTRY[name], args, path, f"curve {name!r}", ())
    else:
        names = _scheduler_names()
        if isinstance(name, str) and name in _NOT_FROM_A_FILE:
            raise ConfigError(
                f"{path}.scheduler",
                f"{name} cannot be built from a config: {_NOT_FROM_A_FILE[name]}",
            )
        if not isinstance(name, str) or name not in names:
            raise _unknown_name(
                f"{path}.scheduler", name, names, "a class of torch.optim.lr_scheduler"
            )
        params = _check_signature(
            getattr(lr_scheduler, name).__init__,
            args,
            path,
            f"torch.optim.lr_scheduler.{name}",
            ("self", "optimizer"),
        )
        for key, value in args.items():
            _check_annotated(value, params[key].annotation, f"{path}.{key}")
    return ScheduleSpec(target=target, kind=kind, name=name, args=dict(args))


def _unknown_name(path: str, name: Any, allowed: list[str], what: str) -> ConfigError:
    hint = did_you_mean(str(name), allowed)
    return ConfigError(
        path, f"expected {what}{hint}, got {show(name)}; known: {', '.join(allowed)}"
    )


def _builtin_curve(name: str, args: Mapping[str, Any], path: str) -> Curve:
    try:
        return BUILTIN_CURVES[name](**args)
    except ArgumentError as error:
        raise from_argument_error(f"{path}.{error.argument}", error) from None


def _check_annotated(value: Any, annotation: Any, path: str) -> None:
    """Check a torch scheduler argument against its (string) annotation, since most
    schedulers only use their numbers at the first ``step()``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    options = [t.strip() for t in text.split("|")]
    if value is None and "None" in options:
        return
    for option in options:
        if option == "int" and is_integer(value):
            return
        if option == "float" and is_real(value) and math.isfinite(value):
            return
        if option == "bool" and isinstance(value, bool):
            return
        if option in ("list[float]", "Iterable[int]") and isinstance(value, list):
            for i, item in enumerate(value):
                if option == "Iterable[int]":
                    check_int(item, f"{path}[{i}]")
                else:
                    check_number(item, f"{path}[{i}]")
            return
        if option.startswith("Literal["):
            choices = [c.strip().strip("'\"") for c in option[8:-1].split(",")]
            if value in choices:
                return
            raise expected(path, "one of " + ", ".join(choices), value)
        if option.startswith("Callable"):
            raise expected(path, "null (a function cannot come from a config)", value)
    words = {
        "int": "an integer",
        "float": "a finite number",
        "bool": "true or false",
        "None": "null",
        "list[float]": "a list of numbers",
        "Iterable[int]": "a list of integers",
    }
    known = [words[o] for o in options if o in words]
    if known and len(known) == len(options):
        raise expected(path, " or ".join(known), value)


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
            curve = _builtin_curve(spec.name, spec.args, path)
        else:
            curve = _registered_curve(spec, path)
        return bind_curve(optimizer, curve, spec.target)
    cls = getattr(lr_scheduler, spec.name)
    return arbitrary_schedule_factory(
        optimizer, lambda proxy: cls(proxy, **spec.args), schedule_target=spec.target
    )


def _registered_curve(spec: ScheduleSpec, path: str) -> Curve:
    curve = _REGISTRY[spec.name](**spec.args)
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
    optimizer: Optimizer, spec: Mapping[str, Any] | TrainConfig | str | os.PathLike[str]
) -> SynchronousSchedule:
    """Build the SynchronousSchedule that a spec describes (``docs/api.md``).

    Args:
        optimizer: the real optimizer. Keys in ``extend`` are added to it first.
        spec: a mapping with ``schedules`` (and optionally ``extend``), a path to a YAML
            file holding one, or a loaded :class:`TrainConfig`.

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
    built: list[LRScheduler] = []
    with unchanged_on_error(optimizer):
        try:
            _apply_extend(optimizer, extend, "extend")
            for target, entry in schedules.items():
                built.append(_build_one(optimizer, entry, f"schedules.{target}"))
            return SynchronousSchedule(built)
        except BaseException:
            for scheduler in built:
                if isinstance(scheduler.optimizer, BoundOptimizer):
                    scheduler.optimizer.detach()
            raise


class Run(NamedTuple):
    """What a train config builds before any training: the optimizer and its schedule."""

    optimizer: Optimizer
    schedule: SynchronousSchedule


def build_run(config: TrainConfig, param_groups: Sequence[dict[str, Any]] | None = None) -> Run:
    """The config's optimizer over ``param_groups`` (dicts with ``params`` and maybe a
    ``name``: ``decay`` / ``no_decay``) and its schedule, ``extend`` applied.

    ``param_groups=None`` uses one placeholder parameter per group, shaped like the job's
    groups: enough for every scheduled value (``schedany validate`` and ``preview``).
    """
    groups = placeholder_groups(config.optimizer) if param_groups is None else param_groups
    optimizer = make_optimizer(config.optimizer, groups)
    return Run(optimizer, build_schedule(optimizer, config))
