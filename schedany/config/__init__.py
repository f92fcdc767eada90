"""Typed train configs and the YAML schedule spec (``docs/api.md``).

- :func:`load_config` reads a YAML train config (safe loader only), applies ``--set``
  overrides, checks it strictly and returns a :class:`TrainConfig`.
- :func:`build_schedule` turns ``extend`` + ``schedules`` into a SynchronousSchedule;
  :func:`build_run` builds a config's optimizer and schedule together.
- :func:`register_curve` adds a named curve that specs can use as ``curve: name``.

Every mistake is a :class:`ConfigError` whose message starts with the dotted path.
:mod:`schedany.config.parsing` holds the pieces other config files are read with.
"""

from ._load import config_to_dict, load_config, parse_config
from ._schedule import Run, build_run, build_schedule
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
from ._spec import curve_names, register_curve, unregister_curve
from .parsing import ConfigError

__all__ = [
    "ConfigError",
    "ControlSection",
    "DataSection",
    "DistributedSection",
    "GuardSection",
    "ModelSection",
    "OptimizerSection",
    "Run",
    "ScheduleSpec",
    "TrainConfig",
    "TrainSection",
    "build_run",
    "build_schedule",
    "config_to_dict",
    "curve_names",
    "load_config",
    "parse_config",
    "register_curve",
    "unregister_curve",
]
