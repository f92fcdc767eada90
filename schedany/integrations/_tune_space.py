"""The search space of a sweep (docs/tuning.md, "The sweep file"): its distributions,
one point of it written into a train config, and PBT's explore step,
:class:`LegalExplore`, which picks a legal explored config. A donor's checkpoint is
restored into it by :func:`~schedany.job.rebuild.rebuild_at_step`, the
mechanism that ``schedany train --from`` and live edits use too.

A ``search`` block maps a dotted config path to one distribution::

    schedules.lr.num_warmup_steps: {randint: [5, 50]}      # integers 5..50, both included
    optimizer.weight_decay: {grid: [0.0, 0.01, 0.1]}

This module does not import ray: a :class:`Distribution` validates and clamps values
by itself, and only :meth:`Distribution.to_tune` imports ``ray.tune``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..config import ConfigError, TrainConfig, parse_config
from ..errors import is_integer, is_real

logger = logging.getLogger(__name__)

Kind = Literal["uniform", "loguniform", "randint", "choice", "grid"]
KINDS: tuple[str, ...] = get_args(Kind)


def _is_number(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)


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
        raise ConfigError(
            path, f"unknown distribution {kind!r}; expected one of {', '.join(KINDS)}"
        )
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
        if not (is_integer(low) and is_integer(high)):
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
        raise ConfigError(
            path, f"expected a mapping of config path -> distribution, got {search!r}"
        )
    space: dict[str, Distribution] = {}
    for key, spec in search.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                path,
                f"expected a dotted config path like 'schedules.lr.num_warmup_steps', got {key!r}",
            )
        space[key] = parse_distribution(spec, f"{path}.{key}")
    return space


# --- one point of the space, written into a config -----------------------------------


def set_path(data: dict[str, Any], path: str, value: Any, *, where: str, create: bool) -> None:
    """Write ``value`` at dotted ``path`` of ``data`` in place. With ``create=False``
    every mapping on the way must already exist (a search path must name a field of a
    block or a schedule the base config has)."""
    parts = path.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        here = ".".join(parts[: depth + 1])
        if child is None:
            if not create:
                raise ConfigError(where, f"unknown config path: the base config has no {here!r}")
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(where, f"unknown config path: {here!r} is a value, not a mapping")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def resolve_trial_config(base: Mapping[str, Any], values: Mapping[str, Any]) -> TrainConfig:
    """``base`` with each dotted ``path: value`` of ``values`` written in and parsed
    strictly (the trial builds it). Raises :class:`ConfigError`."""
    data = copy.deepcopy(dict(base))
    for path, value in values.items():
        set_path(data, path, value, where=path, create=True)
    return parse_config(data)


# --- PBT's explore step --------------------------------------------------------------


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class LegalExplore:
    """PBT's ``custom_explore_fn``: a legal trial config from a perturbed one.

    Ray perturbs a value by ×1.2 / ×0.8 or resamples it; that can leave the declared
    range, make a warmup longer than the training, or (for a value that started as a
    float) give a float where the config wants an integer. Each of these is repaired,
    then the whole config is checked; anything still wrong falls back to the base
    config's values.

    Args:
        base: the base train config (plain data) the trial values are written into.
        mutations: dotted path -> the distribution it was declared with.
    """

    def __init__(self, base: Mapping[str, Any], mutations: Mapping[str, Distribution]) -> None:
        self.base = dict(base)
        self.mutations = dict(mutations)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for path, dist in self.mutations.items():
            if path in out:
                out[path] = dist.clamp(out[path])
        self._fit_warmups(out)
        try:
            resolve_trial_config(self.base, out)
        except ConfigError as exc:
            logger.warning(
                "PBT explored an illegal config (%s); keeping the base values of %s",
                exc,
                sorted(self.mutations),
            )
            for path in self.mutations:
                base_value = _lookup(self.base, path)
                if base_value is None:
                    out.pop(path, None)
                else:
                    out[path] = base_value
        return out

    def _fit_warmups(self, out: dict[str, Any]) -> None:
        """Warmup <= training steps in every schedule: a mutated warmup is cut to the
        training length; a mutated training length is raised to the warmup."""
        for name, entry in (self.base.get("schedules") or {}).items():
            if not isinstance(entry, Mapping):
                continue
            w_path = f"schedules.{name}.num_warmup_steps"
            m_path = f"schedules.{name}.num_training_steps"
            warmup = out.get(w_path, entry.get("num_warmup_steps"))
            total = out.get(m_path, entry.get("num_training_steps"))
            if not (isinstance(warmup, int) and isinstance(total, int)) or warmup <= total:
                continue
            if w_path in self.mutations:
                out[w_path] = total
            else:
                out[m_path] = warmup
