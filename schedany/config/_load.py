"""A train config from its file: read, ``--set`` overrides, a strict parse that checks
every block and how the blocks fit together; and back to plain data.

Nothing is built here: the optimizer and the schedule are built once, by the command
that uses them (``schedany train`` on the model's parameters, ``validate`` and
``preview`` on placeholders), and the checks that need them run there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._targets import is_numeric
from ._optimizer import initial_value, parse_optimizer
from ._schedule import parse_extend
from ._schema import (
    ControlSection,
    DataSection,
    DistributedSection,
    GuardSection,
    ModelSection,
    OptimizerSection,
    ScheduleSpec,
    TrainConfig,
    TrainSection,
)
from ._spec import parse_schedules
from .parsing import (
    ConfigError,
    apply_overrides,
    as_mapping,
    check_int,
    expected,
    from_mapping,
    read_yaml,
    show,
    unknown_key,
)

BLOCKS = tuple(f.name for f in dataclasses.fields(TrainConfig))
"""The top-level blocks of a train config, in file order."""


def parse_config(data: Any) -> TrainConfig:
    """Strictly turn a loaded mapping into a :class:`TrainConfig`: every field's type and
    bounds, every curve's arguments, and how the blocks fit together."""
    data = as_mapping(data, "", "a mapping of blocks (optimizer, schedules, train, ...)")
    for key in data:
        if key not in BLOCKS:
            raise unknown_key("", key, BLOCKS, "block")
    sections = {
        "model": ModelSection,
        "data": DataSection,
        "control": ControlSection,
        "guard": GuardSection,
        "train": TrainSection,
        "distributed": DistributedSection,
    }
    kwargs: dict[str, Any] = {
        name: from_mapping(cls, data.get(name), name) for name, cls in sections.items()
    }
    if "seed" in data:
        kwargs["seed"] = check_int(data["seed"], "seed", min=0)
    kwargs["optimizer"] = parse_optimizer(data.get("optimizer"))
    kwargs["extend"] = parse_extend(data.get("extend"))
    kwargs["schedules"] = parse_schedules(data.get("schedules"))
    config = TrainConfig(**kwargs)
    _check_blocks_fit(config)
    _check_guard(config)
    config.train.budget()  # exactly one: two are refused as the block is read, none here
    return config


def _check_blocks_fit(config: TrainConfig) -> None:
    """The rules that span blocks; each field's own rules are checked as it is read."""
    m, d, c = config.model, config.data, config.control
    if d.min_len is not None and d.min_len > m.seq_len:
        raise expected("data.min_len", f"an integer <= model.seq_len ({m.seq_len})", d.min_len)
    if d.path is not None and not Path(d.path).is_dir():
        raise expected("data.path", "an existing folder of text files", d.path)
    if c.max_accumulation_steps is not None and c.kind != "gnts":
        raise ConfigError(
            "control.max_accumulation_steps", f"only applies to kind gnts, but kind is {c.kind}"
        )
    if c.noise_scale and c.kind == "none":
        raise ConfigError(
            "control.noise_scale", "needs a controller: set control.kind to logical_batch or gnts"
        )
    if c.norm != "exact" and c.kind != "gnts":
        raise ConfigError("control.norm", f"only applies to kind gnts, but kind is {c.kind}")
    if c.sketch_size is not None and c.norm != "sketch":
        raise ConfigError(
            "control.sketch_size", f"only applies to norm sketch, but norm is {c.norm}"
        )
    for name, spec in config.schedules.items():
        if spec.kind == "scheduler" and spec.name == "ReduceLROnPlateau":
            raise ConfigError(
                f"schedules.{name}.scheduler",
                "ReduceLROnPlateau needs a metric "
                "at every step; the reference trainer steps schedules without one",
            )
    key = config.control_key()
    if key is None or key in config.extend:
        return
    try:
        value = initial_value(config.optimizer, key)
    except KeyError:
        raise ConfigError(
            "control.key",
            f"control.kind {c.kind} reads optimizer key {key!r}, which "
            f"is neither an optimizer argument nor in extend; add `extend: {{{key}: "
            "...}` (and usually a schedule for it)",
        ) from None
    if not is_numeric(value):
        raise ConfigError("control.key", f"optimizer.{key} is {show(value)}, not a number")


def _check_guard(config: TrainConfig) -> None:
    """Each ``guard`` key names a numeric optimizer key that starts >= 0."""
    for field in ("clip_key", "skip_key"):
        key = getattr(config.guard, field)
        if key is None:
            continue
        path = f"guard.{field}"
        if key in config.extend:
            value, source = config.extend[key], f"extend.{key}"
        else:
            try:
                value, source = initial_value(config.optimizer, key), f"optimizer.{key}"
            except KeyError:
                raise ConfigError(
                    path,
                    f"optimizer key {key!r} is neither an optimizer argument nor in extend; "
                    f"add `extend: {{{key}: ...}}` (and usually a schedule for it)",
                ) from None
        if not is_numeric(value):
            raise ConfigError(path, f"{source} is {show(value)}, not a number")
        if not value >= 0:
            raise ConfigError(
                path, f"{source} is {show(value)}; a gradient norm bound must be >= 0"
            )


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
    return parse_config(data)


def _schedule_entry(spec: ScheduleSpec) -> dict[str, Any]:
    entry = {spec.kind: spec.name, **spec.args}
    if spec.unit != "steps":
        entry["unit"] = spec.unit
    if spec.every != 1:
        entry["every"] = spec.every
    return entry


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
