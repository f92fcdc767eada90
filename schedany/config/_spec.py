"""Reading the ``schedules:`` block: each entry's curve or torch scheduler, its arguments
and its unit, checked without an optimizer; and the registry of named curves.

Nothing named in a spec is imported by path: ``curve:`` names a built-in schedule or
a curve registered from Python with :func:`register_curve`; ``scheduler:`` names a
class of ``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch.optim.lr_scheduler as lr_scheduler
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .._clock import check_unit
from .._targets import parse_target
from ..curves import BUILTIN_CURVES, Curve
from ..errors import ArgumentError, TargetError, is_integer, is_real
from ._schema import ScheduleSpec
from .parsing import (
    ConfigError,
    as_mapping,
    check_int,
    check_number,
    expected,
    from_argument_error,
    unknown_key,
    unknown_name,
)

CurveFactory = Callable[..., Curve]

REGISTRY: dict[str, CurveFactory] = {}
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
    if name in REGISTRY and not overwrite:
        raise ValueError(f"register_curve: {name!r} is already registered; pass overwrite=True")
    REGISTRY[name] = factory


def unregister_curve(name: str) -> None:
    """Remove a curve added with :func:`register_curve` (``KeyError`` if absent)."""
    try:
        del REGISTRY[name]
    except KeyError:
        raise KeyError(f"unregister_curve: no registered curve {name!r}") from None


def curve_names() -> list[str]:
    """The built-in schedule names, then the registered curves."""
    return [*BUILTIN_CURVES, *REGISTRY]


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
    # `every` belongs to the spec only for a torch scheduler; a curve's t counts its unit,
    # so a curve may take an argument of that name.
    own = (kind, "unit", "every") if kind == "scheduler" else (kind, "unit")
    args = {k: v for k, v in entry.items() if k not in own}
    unit, every = _parse_unit(entry, kind, path)
    if kind == "curve":
        if not isinstance(name, str) or name not in curve_names():
            raise unknown_name(
                f"{path}.curve", name, curve_names(), "a built-in or registered curve"
            )
        if name in BUILTIN_CURVES:
            _check_signature(BUILTIN_CURVES[name], args, path, f"curve {name!r}", _BOUND_ARGS)
            _builtin_curve(name, args, path)  # the curve checks its own arguments
        else:
            _check_signature(REGISTRY[name], args, path, f"curve {name!r}", ())
    else:
        names = _scheduler_names()
        if isinstance(name, str) and name in _NOT_FROM_A_FILE:
            raise ConfigError(
                f"{path}.scheduler",
                f"{name} cannot be built from a config: {_NOT_FROM_A_FILE[name]}",
            )
        if not isinstance(name, str) or name not in names:
            raise unknown_name(
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
    return ScheduleSpec(target, kind, name, dict(args), unit, every)


def _parse_unit(entry: Mapping[str, Any], kind: str, path: str) -> tuple[str, int]:
    """``unit`` (every entry) and ``every`` (``scheduler:`` entries): what one step of the
    schedule counts (docs/clock.md)."""
    try:
        unit = check_unit(entry.get("unit", "steps"), "")
    except ArgumentError as error:
        raise from_argument_error(f"{path}.unit", error) from None
    if kind == "curve":
        return unit, 1
    return unit, check_int(entry.get("every", 1), f"{path}.every", min=1)


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
