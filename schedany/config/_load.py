"""Read a train config: YAML (safe loader only), ``--set`` overrides, strict parsing,
and a dry build of optimizer + schedule so every mistake surfaces before a run starts."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .._targets import is_numeric
from ._convert import as_mapping, check_int, from_mapping
from ._errors import ConfigError, expected, show, unknown_key
from ._optimizer import dummy_groups, make_optimizer, parse_optimizer
from ._schedule import build_schedule, parse_extend, parse_schedules
from ._schema import (
    ControlSection,
    DataSection,
    DistributedSection,
    ModelSection,
    OptimizerSection,
    ScheduleSpec,
    TrainConfig,
    TrainSection,
)

__all__ = [
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "parse_config",
    "parse_override",
    "read_yaml",
    "validate_config",
]

BLOCKS = ("seed", "model", "data", "optimizer", "extend", "schedules", "control", "train",
          "distributed")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags, nothing constructed or imported) that also
    reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_error(where: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    if "python/" in problem or "constructor for the tag" in problem:
        tag = re.search(r"tag '([^']*)'", problem)
        return ConfigError(
            where, f"refused YAML tag {tag.group(1) if tag else ''}{at}: configs are read with "
            "yaml.safe_load, which never constructs Python objects or imports code; write "
            "plain values (custom curves are registered from Python with register_curve)"
        )
    return ConfigError(where, f"invalid YAML{at}: {problem}")


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(where, exc) from None


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
        raise ConfigError(f"--set {text}", "expected KEY=VALUE with a dotted KEY, e.g. "
                                           "train.steps=100")
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
                raise ConfigError(where, f"is {show(child)}, not a mapping, so --set "
                                         f"{'.'.join(parts)} cannot go inside it")
            node = child
        node[parts[-1]] = value
    return out


def parse_config(data: Any) -> TrainConfig:
    """Strictly turn a loaded mapping into a :class:`TrainConfig` (types and bounds only;
    :func:`validate_config` checks how the blocks fit together)."""
    data = as_mapping(data, "", "a mapping of blocks (optimizer, schedules, train, ...)")
    for key in data:
        if key not in BLOCKS:
            raise unknown_key("", key, BLOCKS, "block")
    sections = {
        "model": ModelSection, "data": DataSection, "control": ControlSection,
        "train": TrainSection, "distributed": DistributedSection,
    }
    kwargs: dict[str, Any] = {
        name: from_mapping(cls, data.get(name), name) for name, cls in sections.items()
    }
    if "seed" in data:
        kwargs["seed"] = check_int(data["seed"], "seed", min=0)
    kwargs["optimizer"] = parse_optimizer(data.get("optimizer"))
    kwargs["extend"] = parse_extend(data.get("extend"))
    kwargs["schedules"] = parse_schedules(data.get("schedules"))
    return TrainConfig(**kwargs)


def validate_config(config: TrainConfig) -> None:
    """Check how the blocks fit together, with a dry build of the optimizer and the
    schedule on throwaway parameters. Raises :class:`ConfigError`; writes nothing."""
    m, d, c = config.model, config.data, config.control
    if m.d_model % m.n_heads:
        raise expected("model.n_heads", f"a divisor of model.d_model ({m.d_model})", m.n_heads)
    if not d.eval_fraction < 1.0:
        raise expected("data.eval_fraction", "a number in (0, 1)", d.eval_fraction)
    if d.min_len is not None and d.min_len > m.seq_len:
        raise expected("data.min_len", f"an integer <= model.seq_len ({m.seq_len})", d.min_len)
    if d.path is not None and not Path(d.path).is_dir():
        raise expected("data.path", "an existing folder of text files", d.path)
    if c.max_accumulation_steps is not None and c.kind != "gnts":
        raise ConfigError("control.max_accumulation_steps",
                          f"only applies to kind gnts, but kind is {c.kind}")
    optimizer = make_optimizer(config.optimizer, dummy_groups(config.optimizer))
    schedule = build_schedule(optimizer, config)
    for name, member in schedule.schedules.items():
        if isinstance(member, ReduceLROnPlateau):
            raise ConfigError(f"schedules.{name}.scheduler", "ReduceLROnPlateau needs a metric "
                              "at every step; the reference trainer steps schedules without one")
    key = config.control_key()
    if key is not None:
        for i, group in enumerate(optimizer.param_groups):
            if key not in group:
                raise ConfigError(
                    "control.key", f"control.kind {c.kind} reads optimizer key {key!r}, which "
                    f"is neither an optimizer argument nor in extend; add `extend: {{{key}: "
                    "...}` (and usually a schedule for it)"
                )
            if not is_numeric(group[key]):
                raise ConfigError("control.key", f"param_groups[{i}][{key!r}] is "
                                                 f"{show(group[key])}, not a number")


def load_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> TrainConfig:
    """Read, override, parse and validate a train config.

    Args:
        path: a YAML file.
        overrides: ``"a.b=v"`` strings, applied in order (``v`` is parsed as YAML).

    Raises:
        ConfigError: naming the dotted path, the value and what was expected.
    """
    data = as_mapping(read_yaml(path), os.fspath(path), "a mapping of blocks")  # empty file: {}
    data = apply_overrides(data, overrides)
    config = parse_config(data)
    validate_config(config)
    return config


def _schedule_entry(spec: ScheduleSpec) -> dict[str, Any]:
    return {spec.kind: spec.name, **spec.args}


def _optimizer_entry(section: OptimizerSection) -> dict[str, Any]:
    def plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}

    out: dict[str, Any] = {"name": section.name, **plain(section.kwargs)}
    if section.param_groups is not None:
        out["param_groups"] = {k: plain(v) for k, v in section.param_groups.items()}
    return out


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain YAML-able data, in the file's own layout (round-trips through
    :func:`parse_config`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "optimizer":
            out[f.name] = _optimizer_entry(value)
        elif f.name == "schedules":
            out[f.name] = {k: _schedule_entry(v) for k, v in value.items()}
        elif dataclasses.is_dataclass(value):
            out[f.name] = dataclasses.asdict(value)
        else:
            out[f.name] = value if not isinstance(value, dict) else dict(value)
    return out
