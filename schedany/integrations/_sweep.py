"""The sweep file (docs/tuning.md): ``base`` + ``set`` + ``search`` + ``tune``, checked
in full before Ray starts. Does not import ray.

.. code-block:: yaml

    base: ../configs/baseline.yaml          # a train config, relative to this file
    set: {train.steps: 60}                  # fixed overrides for every trial (optional)
    search:                                 # dotted config path -> distribution
      schedules.lr.num_warmup_steps: {grid: [0, 10, 20, 40]}
    tune:
      metric: eval/loss
      mode: min
      scheduler: none                       # none | asha | pbt
      time_attr: global_step                # or clock/steps | clock/samples | clock/tokens

Every mistake is a :class:`~schedany.config.ConfigError` naming the dotted path in the
sweep file (``search.schedules.lr.num_warmup_stepz: ...``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._clock import Clock, Unit
from ..config import ConfigError, TrainConfig, build_run, parse_config
from ..config.parsing import as_mapping, from_mapping, read_yaml, unknown_key
from ._tune_space import Distribution, parse_search, set_path

# PBT restores a donor's model and optimizer state into the explored config, so only
# what the optimizer and schedules read may change; a new model shape or data stream
# would not fit the donor's checkpoint.
_BLOCKS = [f.name for f in dataclasses.fields(TrainConfig)]
PBT_MUTABLE_BLOCKS = ("optimizer", "extend", "schedules", "control")

TimeAttr = Literal["global_step", "clock/steps", "clock/samples", "clock/tokens"]
TIME_UNITS: dict[str, Unit] = {
    "global_step": "steps",
    "clock/steps": "steps",
    "clock/samples": "samples",
    "clock/tokens": "tokens",
}
"""The unit each ``tune.time_attr`` counts."""


@dataclass
class AshaSection:
    """``tune.asha:`` — asynchronous successive halving, counted in ``tune.time_attr``.

    :func:`load_sweep` fills in ``max_t`` and ``grace_period`` when they are ``null``."""

    max_t: int | None = field(default=None, metadata={"min": 1})
    """Longest a trial runs, in the unit of ``tune.time_attr``; ``null``: the train
    budget, when it counts that unit (``train.tokens`` for ``clock/tokens``), else
    required."""
    grace_period: int | None = field(default=None, metadata={"min": 1})
    """How long before a trial can be stopped, in that unit; ``null``:
    ``train.log_every``."""
    reduction_factor: float = field(default=3.0, metadata={"gt": 1.0})
    """How aggressively trials are halved at each rung."""
    brackets: int = field(default=1, metadata={"min": 1})
    """Number of brackets (different grace periods)."""


@dataclass
class PbtSection:
    """``tune.pbt:`` — population based training, counted in ``tune.time_attr``."""

    perturbation_interval: int | None = field(default=None, metadata={"min": 1})
    """Time between exploit/explore decisions, in the unit of ``tune.time_attr``; a
    multiple of ``train.log_every`` (trials report and checkpoint on that cadence).
    Required."""
    burn_in_period: int = field(default=0, metadata={"min": 0})
    """Time before the first perturbation, in that unit."""
    quantile_fraction: float = field(default=0.25, metadata={"min": 0.0})
    """Bottom fraction that clones a top trial (at most 0.5)."""
    resample_probability: float = field(default=0.25, metadata={"min": 0.0})
    """Chance a mutated value is resampled from its distribution instead of perturbed."""
    perturbation_factors: list[float] = field(default_factory=lambda: [1.2, 0.8])
    """Factors a continuous value is multiplied by when perturbed."""
    synch: bool = False
    """Perturb all trials at the same step (waits for the slowest)."""
    mutations: dict[str, Any] | None = None
    """Dotted config path -> distribution, as in ``search``; ``null``: the ``search``
    block. Only ``optimizer.*``, ``extend.*``, ``schedules.*`` and ``control.*``."""


@dataclass
class ResourcesSection:
    """``tune.resources:`` — what one trial gets."""

    cpus: float = field(default=1.0, metadata={"gt": 0.0})
    """CPUs per trial (per worker when ``workers > 1``)."""
    gpus: float = field(default=0.0, metadata={"min": 0.0})
    """GPUs per trial (per worker when ``workers > 1``)."""
    workers: int = field(default=1, metadata={"min": 1})
    """``> 1``: each trial is a DDP job of this many processes (Ray Train's
    ``TorchTrainer``); PBT is not available then."""


@dataclass
class TuneSection:
    """``tune:`` — how the sweep runs."""

    metric: Literal["eval/loss", "train/loss"] = "eval/loss"
    """What trials are ranked by (the losses every trial reports)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher ``metric`` is better."""
    num_samples: int = field(default=1, metadata={"min": 1})
    """Samples of the search space (a ``grid`` runs each of its values this many times)."""
    scheduler: Literal["none", "asha", "pbt"] = "none"
    """Trial scheduler: run all to the end, ASHA early stopping, or PBT."""
    time_attr: TimeAttr = "global_step"
    """What ASHA and PBT count time in: optimizer steps (``global_step``) or a reading of
    the training clock (docs/clock.md), so that trials whose steps consume different
    amounts of data are compared at equal samples or tokens. Its unit must be
    ``train.axis``, the unit trials report in."""
    asha: AshaSection = field(default_factory=AshaSection)
    """ASHA settings (``scheduler: asha``)."""
    pbt: PbtSection = field(default_factory=PbtSection)
    """PBT settings (``scheduler: pbt``)."""
    max_concurrent_trials: int | None = field(default=None, metadata={"min": 1})
    """At most this many trials at once; ``null``: as many as resources allow."""
    max_failures: int = field(default=0, metadata={"min": 0})
    """Restarts of a crashed trial from its last checkpoint."""
    storage_path: str = "runs/tune"
    """Results, checkpoints and per-trial logs go under ``storage_path/name`` (relative
    to the working directory; a shared path or URI on a multi-node cluster)."""
    name: str | None = None
    """Experiment name; ``null``: the sweep file's name without ``.yaml``."""
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    """Per-trial resources."""
    seed: int | None = field(default=None, metadata={"min": 0})
    """Seeds the sampling of the search space (trials' own seeds come from the config)."""
    keep_checkpoints: int | None = field(default=None, metadata={"min": 1})
    """Tune checkpoints kept per trial; ``null``: 2, or all of them under PBT (a donor
    goes on training, and a pruned checkpoint could no longer be cloned)."""


@dataclass
class Sweep:
    """A checked sweep file."""

    path: Path
    base_path: Path
    base: dict[str, Any]
    """The base train config with ``set`` applied, as plain data."""
    search: dict[str, Distribution]
    mutations: dict[str, Distribution]
    tune: TuneSection
    config: TrainConfig
    """The base config, parsed and validated."""

    @property
    def name(self) -> str:
        return self.tune.name or self.path.stem

    @property
    def time_unit(self) -> Unit:
        """The unit ``tune.time_attr`` counts."""
        return TIME_UNITS[self.tune.time_attr]


def _check_space(base: dict[str, Any], space: dict[str, Distribution], block: str) -> None:
    """Try every probe value of every path on the base config."""
    for path, dist in space.items():
        where = f"{block}.{path}"
        head = path.split(".")[0]
        if head not in _BLOCKS:
            raise ConfigError(
                where,
                f"unknown config path: {head!r} is not a block of a "
                f"train config ({', '.join(_BLOCKS)})",
            )
        for value in dist.probes():
            data = copy.deepcopy(base)
            data.setdefault(head, {} if "." in path else None)
            set_path(data, path, value, where=where, create=False)
            try:
                build_run(parse_config(data), clock=Clock())
            except ConfigError as exc:
                if exc.path == path and exc.kind == "unknown_key":
                    raise ConfigError(where, f"unknown config path ({exc.reason})") from None
                raise ConfigError(
                    where, f"{dist.kind} value {value!r} does not fit the base config: {exc}"
                ) from None


def _check_time_attr(sweep: Sweep) -> None:
    """ASHA and PBT see a trial's time only at its reports, which come every
    ``train.log_every`` units of ``train.axis``; counting time in another unit would
    put rungs and perturbations between reports and make the defaults meaningless."""
    unit, axis = sweep.time_unit, sweep.config.train.axis
    if unit != axis:
        same = "global_step" if axis == "steps" else f"clock/{axis}"
        raise ConfigError(
            "tune.time_attr",
            f"{sweep.tune.time_attr} counts {unit}, but train.axis is {axis}: trials report "
            f"every train.log_every {axis}; set train.axis: {unit} (and train.log_every in "
            f"{unit}) in the base config or set:, or tune.time_attr: {same}",
        )


def _budget_in(sweep: Sweep) -> int | None:
    """The train budget when it counts the time_attr's unit, else None."""
    unit, amount = sweep.config.train.budget()
    return amount if unit == sweep.time_unit else None


def _check_asha(sweep: Sweep) -> None:
    """Check ``tune.asha`` and fill in its defaults."""
    asha, unit = sweep.tune.asha, sweep.time_unit
    budget = _budget_in(sweep)
    if asha.max_t is None:
        if budget is None:
            raise ConfigError(
                "tune.asha.max_t",
                f"required field is missing (tune.time_attr {sweep.tune.time_attr} counts "
                f"{unit} but the budget is train.{sweep.config.train.budget()[0]}: give the "
                f"longest a trial runs, in {unit})",
            )
        asha.max_t = budget
    elif budget is not None and asha.max_t > budget:
        raise ConfigError(
            "tune.asha.max_t", f"expected at most train.{unit} ({budget}), got {asha.max_t}"
        )
    if asha.grace_period is None:
        asha.grace_period = sweep.config.train.log_every
    if asha.grace_period > asha.max_t:
        raise ConfigError(
            "tune.asha.grace_period",
            f"expected at most max_t ({asha.max_t}), got {asha.grace_period}",
        )


def _check_pbt(sweep: Sweep) -> None:
    t, train = sweep.tune, sweep.config.train
    pbt, unit = t.pbt, sweep.time_unit
    if t.resources.workers > 1:
        raise ConfigError(
            "tune.resources.workers",
            f"scheduler pbt cannot run multi-worker trials (workers={t.resources.workers}): "
            "restoring a DDP job into a mutated config is not supported; use scheduler "
            "none or asha, or workers: 1",
        )
    if pbt.perturbation_interval is None:
        raise ConfigError(
            "tune.pbt.perturbation_interval",
            f"required field is missing (a multiple of train.log_every = {train.log_every})",
        )
    if pbt.perturbation_interval % train.log_every:
        raise ConfigError(
            "tune.pbt.perturbation_interval",
            f"expected a multiple of train.log_every ({train.log_every}), the cadence in "
            f"{unit} at which trials report and checkpoint, got {pbt.perturbation_interval}",
        )
    budget = _budget_in(sweep)
    if budget is not None and pbt.perturbation_interval >= budget:
        raise ConfigError(
            "tune.pbt.perturbation_interval",
            f"expected less than train.{unit} ({budget}) or PBT never perturbs, "
            f"got {pbt.perturbation_interval}",
        )
    if pbt.quantile_fraction > 0.5:
        raise ConfigError(
            "tune.pbt.quantile_fraction",
            f"expected a number in [0, 0.5], got {pbt.quantile_fraction!r}",
        )
    if pbt.resample_probability > 1.0:
        raise ConfigError(
            "tune.pbt.resample_probability",
            f"expected a number in [0, 1], got {pbt.resample_probability!r}",
        )
    if not sweep.mutations:
        raise ConfigError(
            "tune.pbt.mutations",
            "PBT needs at least one path to mutate (give tune.pbt.mutations or a search block)",
        )
    for path in sweep.mutations:
        if path.split(".")[0] not in PBT_MUTABLE_BLOCKS:
            where = "tune.pbt.mutations" if pbt.mutations is not None else "search"
            raise ConfigError(
                f"{where}.{path}",
                "PBT restores a donor trial's model and optimizer into the mutated config, "
                f"so it can only mutate {', '.join(b + '.*' for b in PBT_MUTABLE_BLOCKS)}",
            )


def load_sweep(path: str | os.PathLike[str], num_samples: int | None = None) -> Sweep:
    """Read and check a sweep file; ``num_samples`` overrides ``tune.num_samples``."""
    sweep_path = Path(path)
    data = as_mapping(
        read_yaml(sweep_path), os.fspath(sweep_path), "a mapping (base, search, tune)"
    )
    allowed = ("base", "set", "search", "tune")
    for key in data:
        if key not in allowed:
            raise unknown_key("", key, allowed, "block")
    if "base" not in data:
        raise ConfigError(
            "base",
            "required field is missing (the train config to sweep, relative to the sweep file)",
        )
    if not isinstance(data["base"], str) or not data["base"]:
        raise ConfigError("base", f"expected a path to a train config, got {data['base']!r}")
    base_path = (sweep_path.parent / data["base"]).resolve()
    if not base_path.is_file():
        raise ConfigError("base", f"no such file: {base_path}")
    base = read_yaml(base_path)
    base = copy.deepcopy(dict(as_mapping(base, os.fspath(base_path), "a mapping of blocks")))
    for key, value in as_mapping(data.get("set"), "set").items():
        set_path(base, key, value, where=f"set.{key}", create=True)
    try:
        config = parse_config(base)
        build_run(config, clock=Clock())
    except ConfigError as exc:
        raise ConfigError("base", f"{base_path}: {exc}") from None
    # Trials run in their own working folders: a relative data folder is made absolute
    # here, against the folder the command runs from (as `schedany train` reads it).
    if config.data.path is not None and not os.path.isabs(config.data.path):
        base.setdefault("data", {})["path"] = os.path.abspath(config.data.path)

    if "search" not in data:
        raise ConfigError(
            "search",
            "required field is missing (dotted config path -> "
            "distribution, e.g. schedules.lr.num_warmup_steps: {randint: [5, 50]})",
        )
    search = parse_search(data["search"], "search")
    if not search:
        raise ConfigError("search", "expected at least one config path to search over")
    _check_space(base, search, "search")
    tune_data = dict(as_mapping(data.get("tune"), "tune"))
    pbt_data = dict(as_mapping(tune_data.get("pbt"), "tune.pbt"))
    raw_mutations = pbt_data.pop("mutations", None)  # checked by parse_search below
    tune = from_mapping(TuneSection, {**tune_data, "pbt": pbt_data}, "tune")
    tune.pbt.mutations = raw_mutations
    if num_samples is not None:
        tune.num_samples = num_samples
    mutations = search
    if tune.pbt.mutations is not None:
        mutations = parse_search(tune.pbt.mutations, "tune.pbt.mutations")
        _check_space(base, mutations, "tune.pbt.mutations")
    sweep = Sweep(sweep_path, base_path, base, search, mutations, tune, config)
    if tune.scheduler != "none":
        _check_time_attr(sweep)
    if tune.scheduler == "pbt":
        _check_pbt(sweep)
    if tune.scheduler == "asha":
        _check_asha(sweep)
    if tune.resources.workers > 1 and config.distributed.strategy == "none":
        raise ConfigError(
            "tune.resources.workers",
            f"{tune.resources.workers} workers need "
            "distributed.strategy auto, ddp or fsdp in the base config, not none",
        )
    return sweep
