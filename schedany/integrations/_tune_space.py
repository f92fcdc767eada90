"""Search distributions of a sweep file, as plain data, and their Ray Tune form.

A sweep's ``search`` block maps a dotted config path to one distribution::

    schedules.lr.num_warmup_steps: {randint: [5, 50]}      # integers 5..50, both included
    schedules.lr.anneal_to_value: {loguniform: [1.0e-3, 0.1]}
    schedules.lr.curve: {choice: [cosine_annealing_with_warmup, linear_schedule_with_warmup]}
    optimizer.weight_decay: {grid: [0.0, 0.01, 0.1]}

This module does not import ray: a :class:`Distribution` validates and clamps values
by itself, and only :meth:`Distribution.to_tune` imports ``ray.tune``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..config import ConfigError

__all__ = ["Distribution", "Kind", "parse_distribution", "parse_search"]

Kind = Literal["uniform", "loguniform", "randint", "choice", "grid"]
KINDS: tuple[str, ...] = get_args(Kind)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Distribution:
    """One search distribution.

    ``uniform`` / ``loguniform``: ``args = (low, high)``, floats, ``low < high``
    (``low > 0`` for loguniform). ``randint``: integers ``low..high``, **both ends
    included** (unlike ``tune.randint``, whose upper end is excluded). ``choice``: one
    of ``args``, sampled. ``grid``: every one of ``args``, each in its own trial.
    """

    kind: Kind
    args: tuple[Any, ...]

    @property
    def is_range(self) -> bool:
        return self.kind in ("uniform", "loguniform", "randint")

    def probes(self) -> list[Any]:
        """The values a sweep is checked with before any trial runs: both ends of a
        range, every value of a choice or grid."""
        return list(self.args)

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.uniform``, ``tune.grid_search``, ...)."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            low, high = self.args
            return tune.randint(low, high + 1)  # tune excludes the upper end
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def to_mutation(self) -> Any:
        """What PBT's ``hyperparam_mutations`` takes: a domain for a range (perturbed
        by the factors, resampled from the domain), the list for a choice or grid
        (shifted to a neighbour, or resampled from the list)."""
        if self.is_range:
            return self.to_tune()
        return list(self.args)

    def clamp(self, value: Any) -> Any:
        """``value`` made legal for this distribution: a range clamps into
        ``[low, high]`` (and an integer range rounds to an integer); a choice or grid
        snaps to the nearest allowed number, or keeps ``value`` when it is allowed."""
        if self.is_range:
            low, high = self.args
            if not _is_number(value):
                return low
            value = min(max(value, low), high)
            return int(round(value)) if self.kind == "randint" else float(value)
        if value in self.args:
            return value
        numbers = [a for a in self.args if _is_number(a)]
        if _is_number(value) and numbers:
            return min(numbers, key=lambda a: abs(a - value))
        return self.args[0]


def parse_distribution(spec: Any, path: str) -> Distribution:
    """Check one ``{kind: args}`` entry; errors name ``path`` (``search.<config path>``)."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            path,
            f"expected a mapping with exactly one of {', '.join(KINDS)} "
            f"(e.g. {{randint: [5, 50]}}), got {spec!r}",
        )
    ((kind, args),) = spec.items()
    where = f"{path}.{kind}"
    if kind not in KINDS:
        raise ConfigError(path, f"unknown distribution {kind!r}; expected one of {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(where, f"expected a non-empty list of values, got {args!r}")
        for i, value in enumerate(args):
            if isinstance(value, (Mapping, list)):
                raise ConfigError(f"{where}[{i}]", f"expected a scalar value, got {value!r}")
        if len({repr(v) for v in args}) != len(args):
            raise ConfigError(where, f"values must be distinct, got {args!r}")
        return Distribution(kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(where, f"expected [low, high], got {args!r}")
    low, high = args
    if kind == "randint":
        if not (_is_int(low) and _is_int(high)):
            raise ConfigError(where, f"expected two integers [low, high], got {args!r}")
        if low > high:
            raise ConfigError(where, f"expected low <= high, got {args!r}")
        return Distribution(kind, (low, high))
    if not (_is_number(low) and _is_number(high)):
        raise ConfigError(where, f"expected two finite numbers [low, high], got {args!r}")
    if low >= high:
        raise ConfigError(where, f"expected low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(where, f"expected 0 < low < high, got {args!r}")
    return Distribution(kind, (float(low), float(high)))


def parse_search(search: Any, path: str = "search") -> dict[str, Distribution]:
    """Check a whole ``search`` block: dotted config path -> distribution."""
    if not isinstance(search, Mapping):
        raise ConfigError(path, f"expected a mapping of config path -> distribution, got {search!r}")
    space: dict[str, Distribution] = {}
    for key, spec in search.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(path, f"expected a dotted config path like 'schedules.lr.num_warmup_steps', got {key!r}")
        space[key] = parse_distribution(spec, f"{path}.{key}")
    return space
