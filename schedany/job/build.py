"""Build the pieces of the reference job from a :class:`~schedany.config.TrainConfig`:
the model, the optimizer and schedule over its parameters, the controller and the guard."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from .._clock import Clock
from ..config import Run, TrainConfig
from ..config import build_run as build_config_run
from ..config.parsing import from_argument_error
from ..control import GradientNormThreshold, LogicalBatchSize
from ..control.guard import GradientGuard
from ..errors import ArgumentError
from . import model as model_lib

__all__ = ["Controller", "build_controller", "build_guard", "build_model", "build_run"]

Controller = LogicalBatchSize | GradientNormThreshold | None
"""What :func:`build_controller` returns; ``None`` for ``control.kind: none``."""


def build_model(config: TrainConfig) -> model_lib.ByteTransformer:
    """The byte-level transformer on the CPU, initialised from ``config.seed``."""
    return model_lib.build_model(config.model, seed=config.seed)


def build_run(
    config: TrainConfig, model: nn.Module | None = None, *, clock: Clock | None = None
) -> Run:
    """The optimizer over ``model``'s parameters (after any DDP/FSDP wrapping), split
    into ``decay`` / ``no_decay`` when ``optimizer.param_groups`` is set, and its
    schedule (``extend`` applied). ``model=None``: placeholder parameters shaped like the
    job's groups (see :func:`schedany.config.build_run`). ``clock``: the training clock
    the schedule follows."""
    if model is None:
        return build_config_run(config, clock=clock)
    if config.optimizer.param_groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        groups = model_lib.param_groups(model)
    return build_config_run(config, groups, clock=clock)


def build_controller(config: TrainConfig, model: nn.Module, optimizer: Optimizer) -> Controller:
    """The controller of ``control.kind`` on ``model`` (plain, DDP or FSDP2), or None.

    Raises:
        ConfigError: at ``control.<argument>`` when the controller refuses an argument
            for this model (``control.norm: sketch`` under FSDP).
    """
    control = config.control
    key = config.control_key()
    if control.kind == "none" or key is None:
        return None
    noise = {"noise_scale": control.noise_scale, "noise_scale_ema": control.noise_scale_ema}
    if control.kind == "logical_batch":
        micro = config.train.micro_batch_size if control.items == "samples" else None
        return LogicalBatchSize(model, optimizer, key=key, micro_batch_size=micro, **noise)
    # Unset in the config: the controller's own default.
    sketch = {} if control.sketch_size is None else {"sketch_size": control.sketch_size}
    try:
        return GradientNormThreshold(
            model,
            optimizer,
            key=key,
            max_accumulation_steps=control.max_accumulation_steps,
            norm=control.norm,
            sketch_seed=config.seed,  # a run's seed fixes its sketches too
            **sketch,
            **noise,
        )
    except ArgumentError as error:
        raise from_argument_error(f"control.{error.argument}", error) from None


def build_guard(
    config: TrainConfig, model: nn.Module, optimizer: Optimizer
) -> GradientGuard | None:
    """The ``guard:`` block's :class:`~schedany.GradientGuard` on ``model``, or None."""
    guard = config.guard
    if guard.clip_key is None and guard.skip_key is None:
        return None
    return GradientGuard(optimizer, guard.clip_key, guard.skip_key, model=model)
