"""Strict conversion of loaded YAML (plain dicts, lists, scalars) into typed dataclasses.

A field's annotation says what it accepts (``int``, ``float``, ``str``, ``bool``,
``Literal[...]``, ``X | None``, ``list[str]``); ``field(metadata=...)`` adds bounds
(``min``: inclusive, ``gt``: exclusive). Unknown keys, wrong types and values out of
bounds raise :class:`ConfigError` naming the dotted path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from ._errors import ConfigError, expected, unknown_key

__all__ = ["as_mapping", "check_int", "check_number", "from_mapping"]

T = TypeVar("T")


def as_mapping(value: Any, path: str, what: str = "a mapping") -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise expected(path, what, value)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {key!r}")
    return value


def _bounded(what: str, min: float | None, gt: float | None) -> str:
    if gt is not None:
        return f"{what} > {gt}"
    return f"{what} >= {min}" if min is not None else what


def _within(value: float, min: float | None, gt: float | None) -> bool:
    return (min is None or value >= min) and (gt is None or value > gt)


def check_int(value: Any, path: str, *, min: int | None = None, gt: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not _within(value, min, gt):
        raise expected(path, _bounded("an integer", min, gt), value)
    return value


def check_number(
    value: Any, path: str, *, min: float | None = None, gt: float | None = None
) -> float:
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or not _within(value, min, gt)
    ):
        raise expected(path, _bounded("a finite number", min, gt), value)
    return value


def _convert(value: Any, annotation: Any, path: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        if len(options) != 1:  # pragma: no cover - the schema uses only `X | None`
            raise TypeError(f"unsupported annotation {annotation!r} at {path}")
        return _convert(value, options[0], path, meta)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices or isinstance(value, bool):
            raise expected(path, "one of " + ", ".join(map(str, choices)), value)
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise expected(path, "a list", value)
        return [_convert(v, item, f"{path}[{i}]", {}) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, path)  # type: ignore[arg-type]
    if annotation is int:
        return check_int(value, path, min=meta.get("min"), gt=meta.get("gt"))
    if annotation is float:
        return float(check_number(value, path, min=meta.get("min"), gt=meta.get("gt")))
    if annotation is bool:
        if not isinstance(value, bool):
            raise expected(path, "true or false", value)
        return value
    if annotation is str:
        if not isinstance(value, str) or not value:
            raise expected(path, "a non-empty string", value)
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {path}")  # pragma: no cover


def from_mapping(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass ``cls`` from ``data``; missing fields take their defaults."""
    data = as_mapping(data, path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise unknown_key(path, key, fields)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name,
                                fields[name].metadata)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{path}.{name}" if path else name, "required field is missing")
    return cls(**kwargs)
