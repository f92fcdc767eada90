"""The thirteen built-in schedules: a curve from :mod:`schedany.curves`, a
``LambdaLR``, and a bind. ``value(t) = initial_value * lambda(t)``; the exact
formulas are in :func:`schedany.curves.warmup_anneal_curve`.

Every built-in validates its arguments before it touches the optimizer, and
takes ``schedule_target="lr"`` and ``default_value=None``.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ._binding import arbitrary_schedule_factory
from .curves import AnnealKind, Curve, WarmupKind, constant_curve, warmup_anneal_curve

__all__ = [
    "cosine_annealing_with_warmup",
    "cosine_annealing_with_inverse_warmup",
    "polynomial_schedule_with_warmup",
    "polynomial_schedule_with_inverse_warmup",
    "linear_schedule_with_warmup",
    "linear_schedule_with_inverse_warmup",
    "quadratic_schedule_with_warmup",
    "quadratic_schedule_with_inverse_warmup",
    "sqrt_schedule_with_warmup",
    "sqrt_schedule_with_inverse_warmup",
    "constant_with_warmup",
    "constant_with_inverse_warmup",
    "constant_schedule",
    "warmup_to_constant",
]


def bind_curve(
    optimizer: Optimizer, curve: Curve, schedule_target: str = "lr", default_value: Any = None
) -> LambdaLR:
    """A ``LambdaLR`` running ``curve`` on ``schedule_target``."""
    return arbitrary_schedule_factory(  # type: ignore[return-value]
        optimizer, lambda proxy: LambdaLR(proxy, _once_per_step(curve)), default_value, schedule_target
    )


def _once_per_step(curve: Curve) -> Curve:
    """LambdaLR calls its lambda once per param group with the same ``t``; a pure
    curve need only be evaluated once per step."""
    last_t: int | None = None
    last_value = 0.0

    def cached(t: int) -> float:
        nonlocal last_t, last_value
        if t != last_t:
            last_value = curve(t)
            last_t = t
        return last_value

    return cached


def _warmup_anneal(
    func: str, optimizer: Optimizer, schedule_target: str, default_value: Any, *,
    anneal: AnnealKind, warmup: WarmupKind, **curve_args: Any,
) -> LambdaLR:
    curve = warmup_anneal_curve(anneal=anneal, warmup=warmup, func=func, **curve_args)
    return bind_curve(optimizer, curve, schedule_target, default_value)


def cosine_annealing_with_warmup(
    optimizer: Optimizer, warmup_to_value: float, anneal_to_value: float,
    num_warmup_steps: int, num_training_steps: int,
    schedule_target: str = "lr", default_value: Any = None,
) -> LambdaLR:
    """Linear warmup ``W t / L``, then half-cosine from ``W`` to ``A`` at ``M``, then ``A``."""
    return _warmup_anneal(
        "cosine_annealing_with_warmup", optimizer, schedule_target, default_value,
        anneal="cosine", warmup="normal", warmup_to_value=warmup_to_value,
        anneal_to_value=anneal_to_value, num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )


def cosine_annealing_with_inverse_warmup(
    optimizer: Optimizer, warmup_to_value: float, anneal_to_value: float,
    num_warmup_steps: int, num_training_steps: int, warmup_multiplier: float = 20.0,
    schedule_target: str = "lr", default_value: Any = None,
) -> LambdaLR:
    """Inverse warmup ``W (R - (R-1) t / L)`` down to ``W``, then half-cosine to ``A``."""
    return _warmup_anneal(
        "cosine_annealing_with_inverse_warmup", optimizer, schedule_target, default_value,
        anneal="cosine", warmup="inverse", warmup_to_value=warmup_to_value,
        anneal_to_value=anneal_to_value, num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps, warmup_multiplier=warmup_multiplier,
    )


def polynomial_schedule_with_warmup(
    optimizer: Optimizer, warmup_to_value: float, anneal_to_value: float,
    num_warmup_steps: int, num_training_steps: int, polynomial_exponent: float = 2.0,
    schedule_target: str = "lr", default_value: Any = None,
) -> LambdaLR:
    """Linear warmup ``W t / L``, then ``A + (W - A)(1 - p)^P``, then ``A``."""
    return _warmup_anneal(
        "polynomial_schedule_with_warmup", optimizer, schedule_target, default_value,
        anneal="polynomial", warmup="normal", warmup_to_value=warmup_to_value,
        anneal_to_value=anneal_to_value, num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps, polynomial_exponent=polynomial_exponent,
    )


def polynomial_schedule_with_inverse_warmup(
    optimizer: Optimizer, warmup_to_value: float, anneal_to_value: float,
    num_warmup_steps: int, num_training_steps: int, polynomial_exponent: float = 2.0,
    warmup_multiplier: float = 20.0, schedule_target: str = "lr", default_value: Any = None,
) -> LambdaLR:
    """Inverse warmup ``W (R - (R-1) t / L)``, then ``A + (W - A)(1 - p)^P``, then ``A``."""
    return _warmup_anneal(
        "polynomial_schedule_with_inverse_warmup", optimizer, schedule_target, default_value,
        anneal="polynomial", warmup="inverse", warmup_to_value=warmup_to_value,
        anneal_to_value=anneal_to_value, num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps, polynomial_exponent=polynomial_exponent,
        warmup_multiplier=warmup_multiplier,
    )


def _fixed_exponent(name: str, exponent: float, inverse: bool) -> Any:
    """linear / quadratic / sqrt are the polynomial schedule with P fixed."""
    if inverse:

        def schedule(
            optimizer: Optimizer, warmup_to_value: float, anneal_to_value: float,
            num_warmup_steps: int, num_training_steps: int, warmup_multiplier: float = 20.0,
            schedule_target: str = "lr", default_value: Any = None,
        ) -> LambdaLR:
            return _warmup_anneal(
                name, optimizer, schedule_target, default_value, anneal="polynomial",
                warmup="inverse", warmup_to_value=warmup_to_value, anneal_to_value=anneal_to_value,
                num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                polynomial_exponent=exponent, warmup_multiplier=warmup_multiplier,
            )

        warmup = "inverse warmup ``W (R - (R-1) t / L)``"
    else:

        def schedule(
            optimizer: Optimizer, warmup_to_value: float, anneal_to_value: float,
            num_warmup_steps: int, num_training_steps: int,
            schedule_target: str = "lr", default_value: Any = None,
        ) -> LambdaLR:
            return _warmup_anneal(
                name, optimizer, schedule_target, default_value, anneal="polynomial",
                warmup="normal", warmup_to_value=warmup_to_value, anneal_to_value=anneal_to_value,
                num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                polynomial_exponent=exponent,
            )

        warmup = "linear warmup ``W t / L``"
    schedule.__name__ = schedule.__qualname__ = name
    schedule.__module__ = "schedany"
    schedule.__doc__ = (
        f"{warmup.capitalize()}, then ``A + (W - A)(1 - p)^{exponent}`` "
        f"(the polynomial schedule with P = {exponent}), then ``A``."
    )
    return schedule


linear_schedule_with_warmup = _fixed_exponent("linear_schedule_with_warmup", 1.0, inverse=False)
linear_schedule_with_inverse_warmup = _fixed_exponent("linear_schedule_with_inverse_warmup", 1.0, inverse=True)
quadratic_schedule_with_warmup = _fixed_exponent("quadratic_schedule_with_warmup", 2.0, inverse=False)
quadratic_schedule_with_inverse_warmup = _fixed_exponent("quadratic_schedule_with_inverse_warmup", 2.0, inverse=True)
sqrt_schedule_with_warmup = _fixed_exponent("sqrt_schedule_with_warmup", 0.5, inverse=False)
sqrt_schedule_with_inverse_warmup = _fixed_exponent("sqrt_schedule_with_inverse_warmup", 0.5, inverse=True)


def constant_with_warmup(
    optimizer: Optimizer, warmup_to_value: float, num_warmup_steps: int,
    schedule_target: str = "lr", default_value: Any = None,
) -> LambdaLR:
    """Linear warmup ``W t / L``, then ``W``."""
    return _warmup_anneal(
        "constant_with_warmup", optimizer, schedule_target, default_value,
        anneal="constant", warmup="normal", warmup_to_value=warmup_to_value,
        anneal_to_value=warmup_to_value, num_warmup_steps=num_warmup_steps, num_training_steps=0,
    )


def constant_with_inverse_warmup(
    optimizer: Optimizer, warmup_to_value: float, num_warmup_steps: int,
    warmup_multiplier: float = 20.0, schedule_target: str = "lr", default_value: Any = None,
) -> LambdaLR:
    """Inverse warmup ``W (R - (R-1) t / L)``, then ``W``."""
    return _warmup_anneal(
        "constant_with_inverse_warmup", optimizer, schedule_target, default_value,
        anneal="constant", warmup="inverse", warmup_to_value=warmup_to_value,
        anneal_to_value=warmup_to_value, num_warmup_steps=num_warmup_steps, num_training_steps=0,
        warmup_multiplier=warmup_multiplier,
    )


def constant_schedule(
    optimizer: Optimizer, value: float, schedule_target: str = "lr", default_value: Any = None
) -> LambdaLR:
    """``lambda(t) = value``: the target is ``initial_value * value`` at every step."""
    curve = constant_curve(value, func="constant_schedule")
    return bind_curve(optimizer, curve, schedule_target, default_value)


warmup_to_constant = constant_with_warmup
