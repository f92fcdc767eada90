"""Typed train configs and the YAML schedule spec (SPEC sections 5 and 6).

- :func:`load_config` reads a YAML train config (safe loader only), applies ``--set``
  overrides, checks it strictly and returns a :class:`TrainConfig`.
- :func:`build_schedule` turns ``extend`` + ``schedules`` into a SynchronousSchedule.
- :func:`register_curve` adds a named curve that specs can use as ``curve: name``.

Every mistake is a :class:`ConfigError` whose message starts with the dotted path.
"""

from ._errors import ConfigError
from ._load import (
    apply_overrides,
    config_to_dict,
    load_config,
    parse_config,
    parse_override,
    read_yaml,
    validate_config,
)
from ._optimizer import make_optimizer
from ._schedule import build_schedule, curve_names, register_curve, unregister_curve
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
    "ConfigError",
    "ControlSection",
    "DataSection",
    "DistributedSection",
    "ModelSection",
    "OptimizerSection",
    "ScheduleSpec",
    "TrainConfig",
    "TrainSection",
    "apply_overrides",
    "build_schedule",
    "config_to_dict",
    "curve_names",
    "load_config",
    "make_optimizer",
    "parse_config",
    "parse_override",
    "read_yaml",
    "register_curve",
    "unregister_curve",
    "validate_config",
]
