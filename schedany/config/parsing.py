"""Reading config files: YAML (safe loader only), ``--set`` overrides, and strict
conversion of the loaded values into typed dataclasses, with :class:`ConfigError` naming
the dotted path of every mistake.

The train config and the sweep file are both parsed with these pieces. A field's
annotation says what it accepts (``int``, ``float``, ``str``, ``bool``, ``Literal[...]``,
``X | None``, ``list[str]``); ``field(metadata=...)`` adds bounds (``min``: inclusive,
``gt``: exclusive, ``lt``: exclusive above). The bound rules themselves are
:func:`schedany.errors.check_integer` / :func:`~schedany.errors.check_real`: a config
value obeys the same rule as a function argument, worded with its path.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ..errors import ArgumentError, check_integer, check_real, closest

__all__ = [
    "ConfigError",
    "apply_overrides",
    "as_mapping",
    "check_int",
    "check_number",
    "did_you_mean",
    "expected",
    "from_argument_error",
    "from_mapping",
    "parse_override",
    "read_yaml",
    "show",
    "unknown_key",
    "unknown_name",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, spec or ``--set`` override is wrong.

    The message starts with the dotted path of the offending entry, then says what was
    expected and what was found: ``schedules.lr.num_warmup_steps: expected an integer
    >= 0, got -5``. ``path`` holds the dotted path on its own ("" for the whole file).
    """

    def __init__(self, path: str, message: str, *, kind: str = "invalid") -> None:
        self.path = path
        self.reason = message
        self.kind = kind
        """``"unknown_key"`` for a field, block or argument that does not exist (see
        :func:`unknown_key`); ``"invalid"`` otherwise."""
        super().__init__(f"{path}: {message}" if path else message)


def show(value: Any) -> str:
    """A short rendering of a config value for an error message."""
    if isinstance(value, str):
        text = repr(value)
    elif value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping " + repr(value)
    elif isinstance(value, (list, tuple)):
        text = "a list " + repr(list(value))
    else:
        text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 80 else text[:77] + "..."


def expected(path: str, what: str, value: Any) -> ConfigError:
    """``<path>: expected <what>, got <value>``."""
    return ConfigError(path, f"expected {what}, got {show(value)}")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest candidate (case first), or ""."""
    close = closest(word, candidates)
    return f" (did you mean {close!r}?)" if close else ""


def unknown_key(path: str, key: str, allowed: Iterable[str], what: str = "field") -> ConfigError:
    """An unknown key, with the allowed ones and the closest match."""
    allowed = list(allowed)
    hint = did_you_mean(key, allowed)
    where = f"{path}.{key}" if path else key
    return ConfigError(
        where, f"unknown {what}{hint}; expected one of {', '.join(allowed)}", kind="unknown_key"
    )


def from_argument_error(path: str, error: ArgumentError) -> ConfigError:
    """The config's words for a library argument check: ``<path>: expected <what>, got
    <value>``, ``path`` naming the entry that holds the argument."""
    return expected(path, error.expected, error.value)


def unknown_name(path: str, name: Any, allowed: list[str], what: str) -> ConfigError:
    """A name (a curve, a scheduler or optimizer class) that is not one of ``allowed``."""
    hint = did_you_mean(str(name), allowed)
    return ConfigError(
        path, f"expected {what}{hint}, got {show(name)}; known: {', '.join(allowed)}"
    )


def as_mapping(value: Any, path: str, what: str = "a mapping") -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise expected(path, what, value)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {key!r}")
    return value


def check_int(value: Any, path: str, *, min: int | None = None, gt: int | None = None) -> int:
    """An integer within bounds (:func:`schedany.errors.check_integer`), else a
    :class:`ConfigError` at ``path``."""
    try:
        return check_integer(value, path, min=min, gt=gt)
    except ArgumentError as error:
        raise from_argument_error(path, error) from None


def check_number(
    value: Any,
    path: str,
    *,
    min: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
) -> float:
    """A finite real number within bounds (:func:`schedany.errors.check_real`), else a
    :class:`ConfigError` at ``path``."""
    try:
        return check_real(value, path, min=min, gt=gt, lt=lt)
    except ArgumentError as error:
        raise from_argument_error(path, error) from None


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
        return float(
            check_number(value, path, min=meta.get("min"), gt=meta.get("gt"), lt=meta.get("lt"))
        )
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
        kwargs[name] = _convert(
            value, hints[name], f"{path}.{name}" if path else name, fields[name].metadata
        )
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{path}.{name}" if path else name, "required field is missing")
    return cls(**kwargs)


# --- YAML files and --set overrides ----------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags, nothing constructed or imported) that also
    reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:  # a complex key, `? [a, b]`
                raise yaml.constructor.ConstructorError(
                    None, None, "found a list or mapping as a key", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _RefusedTag(yaml.constructor.ConstructorError):
    """A tag the safe loader has no constructor for (``!!python/object``, ``!foo``)."""

    def __init__(self, tag: str, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"refused tag {tag!r}", mark)
        self.tag = tag


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise _RefusedTag(node.tag, node.start_mark)


# Unknown tags (None) reach this constructor instead of SafeLoader's generic error, so
# the refusal is recognised by its type.
_Loader.add_constructor(None, _refuse_tag)
_Loader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_error(where: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if isinstance(exc, _RefusedTag):
        return ConfigError(
            where,
            f"refused YAML tag {exc.tag}{at}: configs are read with "
            "yaml.safe_load, which never constructs Python objects or imports code; write "
            "plain values (custom curves are registered from Python with register_curve)",
        )
    if isinstance(exc, yaml.reader.ReaderError):  # its str() spans two lines
        char = exc.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return ConfigError(
            where, f"invalid YAML (character {exc.position + 1}): {shown}: {exc.reason}"
        )
    return ConfigError(where, f"invalid YAML{at}: {getattr(exc, 'problem', None) or exc}")


_MAX_DEPTH = 32
_MAX_VALUES = 100_000
"""Bounds no config comes near. PyYAML's parser and every walk over a loaded value
recurse (a deeper one ends in a RecursionError), and a value walks as if its aliases were
copies (a few nested aliases make billions of values)."""


def _parse_yaml(text: str, where: str) -> Any:
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(where, exc) from None
    except RecursionError:
        raise ConfigError(where, f"nested more than {_MAX_DEPTH} levels deep") from None
    # Level by level, so that the check cannot recurse; an alias counts once per use, and
    # the count stops the walk before it expands more than _MAX_VALUES of them.
    level: list[Any] = [value]
    depth = count = 0
    while level:
        below: list[Any] = []
        for node in level:
            items = node.values() if isinstance(node, dict) else node
            if isinstance(node, (dict, list)):
                count += len(items)
                if count > _MAX_VALUES:
                    raise ConfigError(where, f"holds more than {_MAX_VALUES} values")
                below.extend(items)
        depth += 1
        if below and depth >= _MAX_DEPTH:
            raise ConfigError(where, f"nested more than {_MAX_DEPTH} levels deep")
        level = below
    return value


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file with the safe loader; every failure is a :class:`ConfigError`."""
    where = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a folder, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where, f"cannot read it ({exc})") from None
    return _parse_yaml(text, where)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=v"`` -> ``(["a", "b"], v)`` with ``v`` parsed as YAML (``1e-3`` a float,
    ``null`` None, ``[0.9, 0.95]`` a list)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(
            f"--set {text}", "expected KEY=VALUE with a dotted KEY, e.g. train.steps=100"
        )
    return parts, _parse_yaml(raw, f"--set {text}")


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``--set a.b=v`` applied in order. Missing
    intermediate mappings are created; the strict parse then checks every key."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    where,
                    f"is {show(child)}, not a mapping, so --set "
                    f"{'.'.join(parts)} cannot go inside it",
                )
            node = child
        node[parts[-1]] = value
    return out
