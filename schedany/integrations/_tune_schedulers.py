"""Trial schedulers on optimizer steps (``global_step``), and the PBT explore step that
keeps every mutated config legal.

:class:`LegalExplore` is PBT's ``custom_explore_fn``. Ray perturbs a value by
×1.2 / ×0.8 or resamples it; that can leave the declared range, turn a warmup longer
than the training, or (for a value that started as a float) give a float where the
config wants an integer. The explore step repairs each of these, then checks the whole
config; anything still wrong falls back to the base config's values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import ConfigError
from ._sweep import Sweep, resolve_trial_config
from ._tune_space import Distribution

__all__ = ["LegalExplore", "make_scheduler"]

logger = logging.getLogger(__name__)

TIME_ATTR = "global_step"


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class LegalExplore:
    """``custom_explore_fn`` for PBT: a legal trial config from a perturbed one.

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
            logger.warning("PBT explored an illegal config (%s); keeping the base values of %s",
                           exc, sorted(self.mutations))
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


def make_scheduler(sweep: Sweep) -> Any:
    """The Ray Tune trial scheduler of ``tune.scheduler`` (``None`` for ``none``)."""
    t, train = sweep.tune, sweep.config.train
    if t.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if t.scheduler == "asha":
        return ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=t.asha.max_t or train.steps,
            grace_period=t.asha.grace_period or train.log_every,
            reduction_factor=t.asha.reduction_factor,
            brackets=t.asha.brackets,
        )
    pbt = t.pbt
    assert pbt.perturbation_interval is not None  # load_sweep checked it
    return PopulationBasedTraining(
        time_attr=TIME_ATTR,
        perturbation_interval=pbt.perturbation_interval,
        burn_in_period=pbt.burn_in_period,
        hyperparam_mutations={p: d.to_mutation() for p, d in sweep.mutations.items()},
        quantile_fraction=pbt.quantile_fraction,
        resample_probability=pbt.resample_probability,
        perturbation_factors=tuple(pbt.perturbation_factors),
        custom_explore_fn=LegalExplore(sweep.base, sweep.mutations),
        synch=pbt.synch,
    )
