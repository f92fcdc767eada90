"""The built-in schedules: each is its curve from :mod:`schedany.curves` (same name, same
arguments), run by a ``LambdaLR`` bound to ``schedule_target``. ``value(t) =
initial_value * lambda(t)``; the formulas are in ``docs/api.md`` and in each curve's
docstring.

The curve is built first, so a bad argument raises before the optimizer is touched.
``unit`` says what ``t`` counts: optimizer steps, samples or tokens (docs/clock.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from . import curves
from ._binding import arbitrary_schedule_factory
from ._clock import Unit
from .curves import Curve, DecayShape


def bind_curve(
    optimizer: Optimizer,
    curve: Curve,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """A ``LambdaLR`` running ``curve`` on ``schedule_target``; ``t`` counts ``unit``."""
    # With one group there is no evaluation to share, and the cache would only cost.
    one_group = isinstance(optimizer, Optimizer) and len(optimizer.param_groups) == 1
    lam = curve if one_group else _once_per_step(curve)
    return arbitrary_schedule_factory(  # type: ignore[return-value]
        optimizer,
        lambda proxy: LambdaLR(proxy, lam),
        default_value,
        schedule_target,
        unit,
    )


def _once_per_step(curve: Curve) -> Curve:
    """LambdaLR calls its lambda once per param group with the same ``t``; a pure
    curve need only be evaluated once per step.

    A partial, not a closure, so that the schedule pickles and deep-copies (each copy
    with its own cache). ``LambdaLR.state_dict`` saves the partial's ``__dict__``, which
    stays empty: the curve and the cache are its arguments, never state."""
    return partial(_evaluate_once_per_step, curve, [None, 0.0])


def _evaluate_once_per_step(curve: Curve, last: list[Any], t: int) -> float:
    """``curve(t)``, remembered in ``last = [t, value]`` until ``t`` changes."""
    if last[0] != t:
        last[0], last[1] = t, curve(t)
    return last[1]


def cosine_annealing_with_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.cosine_annealing_with_warmup` to ``schedule_target``."""
    curve = curves.cosine_annealing_with_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def cosine_annealing_with_inverse_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.cosine_annealing_with_inverse_warmup` to ``schedule_target``."""
    curve = curves.cosine_annealing_with_inverse_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def polynomial_schedule_with_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    polynomial_exponent: float = 2.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.polynomial_schedule_with_warmup` to ``schedule_target``."""
    curve = curves.polynomial_schedule_with_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, polynomial_exponent
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def polynomial_schedule_with_inverse_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    polynomial_exponent: float = 2.0,
    warmup_multiplier: float = 20.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.polynomial_schedule_with_inverse_warmup` to the target."""
    curve = curves.polynomial_schedule_with_inverse_warmup(
        warmup_to_value,
        anneal_to_value,
        num_warmup_steps,
        num_training_steps,
        polynomial_exponent,
        warmup_multiplier,
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def linear_schedule_with_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.linear_schedule_with_warmup` to ``schedule_target``."""
    curve = curves.linear_schedule_with_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def linear_schedule_with_inverse_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.linear_schedule_with_inverse_warmup` to ``schedule_target``."""
    curve = curves.linear_schedule_with_inverse_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def quadratic_schedule_with_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.quadratic_schedule_with_warmup` to ``schedule_target``."""
    curve = curves.quadratic_schedule_with_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def quadratic_schedule_with_inverse_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.quadratic_schedule_with_inverse_warmup` to the target."""
    curve = curves.quadratic_schedule_with_inverse_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def sqrt_schedule_with_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.sqrt_schedule_with_warmup` to ``schedule_target``."""
    curve = curves.sqrt_schedule_with_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def sqrt_schedule_with_inverse_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.sqrt_schedule_with_inverse_warmup` to ``schedule_target``."""
    curve = curves.sqrt_schedule_with_inverse_warmup(
        warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def constant_with_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    num_warmup_steps: int,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.constant_with_warmup` to ``schedule_target``."""
    curve = curves.constant_with_warmup(warmup_to_value, num_warmup_steps)
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def constant_with_inverse_warmup(
    optimizer: Optimizer,
    warmup_to_value: float,
    num_warmup_steps: int,
    warmup_multiplier: float = 20.0,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.constant_with_inverse_warmup` to ``schedule_target``."""
    curve = curves.constant_with_inverse_warmup(
        warmup_to_value, num_warmup_steps, warmup_multiplier
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def constant_schedule(
    optimizer: Optimizer,
    value: float,
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.constant_schedule` to ``schedule_target``."""
    curve = curves.constant_schedule(value)
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


def warmup_stable_decay(
    optimizer: Optimizer,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    num_decay_steps: int,
    decay_shape: DecayShape = "linear",
    schedule_target: str = "lr",
    default_value: Any = None,
    unit: Unit = "steps",
) -> LambdaLR:
    """Bind :func:`schedany.curves.warmup_stable_decay` to ``schedule_target``."""
    curve = curves.warmup_stable_decay(
        warmup_to_value,
        anneal_to_value,
        num_warmup_steps,
        num_training_steps,
        num_decay_steps,
        decay_shape,
    )
    return bind_curve(optimizer, curve, schedule_target, default_value, unit)


warmup_to_constant = constant_with_warmup
