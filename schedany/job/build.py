"""Build the pieces of the reference job from a :class:`~schedany.config.TrainConfig`.

These are what ``schedany train`` uses, and what ``schedany preview`` and the Ray Tune
adapter reuse: :func:`build_run` gives a throwaway optimizer + schedule shaped exactly
like the job's (same param groups, same keys), without building the model.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn
from torch.optim import Optimizer

from .._synchronous import SynchronousSchedule
from ..config import TrainConfig, build_schedule, make_optimizer
from ..config._optimizer import dummy_groups
from ..control import GradientNormThreshold, LogicalBatchSize
from . import model as model_lib

__all__ = [
    "Controller",
    "Run",
    "build_controller",
    "build_model",
    "build_optimizer",
    "build_run",
    "trace_schedule",
]

Controller = LogicalBatchSize | GradientNormThreshold | None
"""What :func:`build_controller` returns; ``None`` for ``control.kind: none``."""


class Run(NamedTuple):
    optimizer: Optimizer
    schedule: SynchronousSchedule


def model_config(config: TrainConfig) -> model_lib.ModelConfig:
    m = config.model
    return model_lib.ModelConfig(
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        seq_len=m.seq_len,
        mlp_ratio=m.mlp_ratio,
    )


def build_model(config: TrainConfig) -> model_lib.ByteTransformer:
    """The byte-level transformer on the CPU, initialised from ``config.seed``."""
    return model_lib.build_model(model_config(config), seed=config.seed)


def build_optimizer(config: TrainConfig, model: nn.Module | None = None) -> Optimizer:
    """``torch.optim.<optimizer.name>`` over ``model``'s parameters (after any DDP/FSDP
    wrapping), split into ``decay`` / ``no_decay`` when ``optimizer.param_groups`` is
    set. ``model=None`` gives a throwaway optimizer with one parameter per group and
    the same keys: enough to compute every scheduled value."""
    section = config.optimizer
    if model is None:
        groups = dummy_groups(section)
    elif section.param_groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        groups = model_lib.param_groups(model)
    return make_optimizer(section, groups)


def build_run(config: TrainConfig, model: nn.Module | None = None) -> Run:
    """Optimizer (see :func:`build_optimizer`) and its schedule (``extend`` applied)."""
    optimizer = build_optimizer(config, model)
    return Run(optimizer, build_schedule(optimizer, config))


def build_controller(config: TrainConfig, model: nn.Module, optimizer: Optimizer) -> Controller:
    """The controller of ``control.kind`` on ``model`` (plain, DDP or FSDP2), or None."""
    control = config.control
    key = config.control_key()
    if control.kind == "none" or key is None:
        return None
    if control.kind == "logical_batch":
        micro = config.train.micro_batch_size if control.items == "samples" else None
        return LogicalBatchSize(model, optimizer, key=key, micro_batch_size=micro)
    return GradientNormThreshold(
        model, optimizer, key=key, max_accumulation_steps=control.max_accumulation_steps
    )


def trace_schedule(config: TrainConfig, steps: int | None = None) -> tuple[list[str], dict[str, list[list[float]]]]:
    """Every scheduled value the job would use, without training.

    Returns ``(group_labels, values)`` where ``values[key][s - 1]`` holds one value per
    param group for optimizer step ``s`` (``1 <= s <= steps``; default
    ``train.steps``), the same numbers the trainer records in ``metrics.jsonl``.
    Group labels are each group's ``name``, else ``pg<i>``. The same trace as
    :func:`schedany.preview.trace` (which this calls), as a plain pair.
    """
    from ..preview import trace

    groups, values = trace(config, steps)
    return groups, values
