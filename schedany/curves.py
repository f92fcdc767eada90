"""Schedule curves as pure ``step -> multiplier`` functions.

This module does not import torch: a curve is plain arithmetic on the number of
``step()`` calls ``t`` since the schedule was built. The built-in schedules wrap
a curve in a ``LambdaLR`` bound to the chosen optimizer key, so the scheduled
value is ``initial_value * curve(t)``.

Notation (shared by every curve; see ``docs/api.md``):
``W`` = ``warmup_to_value``, ``A`` = ``anneal_to_value``, ``L`` = ``num_warmup_steps``,
``M`` = ``num_training_steps``, ``P`` = ``polynomial_exponent``,
``R`` = ``warmup_multiplier``.

Every curve is one warmup phase joined to one anneal phase and a clamped tail; the
formula is written once, in :func:`warmup_anneal_curve` (:func:`warmup_stable_decay` adds a
stable phase). Each built-in schedule has a curve of the same name and arguments here.

A curve is a :func:`functools.partial` of module-level functions, not a closure, so it
pickles and deep-copies (and with it a built-in schedule, docs/api.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

from ._curve_terms import (
    Curve,
    Shape,
    _constant,
    _cosine_shape,
    _inverse_warmup,
    _linear_shape,
    _linear_warmup,
    _polynomial_shape,
    _sqrt_shape,
    _then_anneal,
    _then_constant,
)
from .errors import ArgumentValueError, check_integer, check_real

__all__ = [
    "Curve",
    "WarmupKind",
    "AnnealKind",
    "DecayShape",
    "warmup_anneal_curve",
    "constant_curve",
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
    "warmup_stable_decay",
    "BUILTIN_CURVES",
]

WarmupKind = Literal["normal", "inverse"]
AnnealKind = Literal["cosine", "polynomial", "constant"]
DecayShape = Literal["linear", "cosine", "sqrt"]


def warmup_anneal_curve(
    *,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    anneal: AnnealKind = "cosine",
    warmup: WarmupKind = "normal",
    polynomial_exponent: float = 1.0,
    warmup_multiplier: float = 20.0,
    func: str = "warmup_anneal_curve",
) -> Curve:
    r"""Validate the arguments, then return ``t -> lambda(t)``.

    .. math::

        \lambda(t) = \begin{cases}
            W t / L \;\text{(normal)} \;\;\text{or}\;\; W (R - (R-1) t / L) \;\text{(inverse)}
                & t < L \\
            A + (W - A) \cdot \tfrac12 (1 + \cos \pi p) \;\text{(cosine)} & L \le t \le M \\
            A + (W - A) (1 - p)^P \;\text{(polynomial)} & L \le t \le M \\
            A & t > M
        \end{cases}

    ``p = (t - L) / (M - L)``, and ``p = 1`` when ``M = L``. ``anneal="constant"``
    uses ``lambda = W`` for ``t >= L`` and ignores ``A``, ``M`` and ``P``.

    Every rule on these arguments lives here; a bad one raises an
    :class:`~schedany.errors.ArgumentError` naming ``func`` (the public function),
    the argument and the value.

    >>> curve = warmup_anneal_curve(warmup_to_value=1.0, anneal_to_value=0.0,
    ...                             num_warmup_steps=2, num_training_steps=4)
    >>> [round(curve(t), 3) for t in range(6)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    W = check_real(warmup_to_value, "warmup_to_value", func=func)
    L = check_integer(num_warmup_steps, "num_warmup_steps", min=0, func=func)
    warm: Curve
    if warmup == "normal":
        warm = partial(_linear_warmup, W, L)
    elif warmup == "inverse":
        R = check_real(warmup_multiplier, "warmup_multiplier", min=1, func=func)
        warm = partial(_inverse_warmup, W, L, R)
    else:
        raise ArgumentValueError(func, "warmup", warmup, "'normal' or 'inverse'")
    if anneal == "constant":
        return partial(_then_constant, warm, L, W)

    A, M = _anneal_end(func, anneal_to_value, num_training_steps, L)
    shape: Shape
    if anneal == "cosine":
        shape = _cosine_shape
    elif anneal == "polynomial":
        P = check_real(polynomial_exponent, "polynomial_exponent", gt=0, func=func)
        shape = partial(_polynomial_shape, P)
    else:
        raise ArgumentValueError(func, "anneal", anneal, "'cosine', 'polynomial' or 'constant'")
    return partial(_then_anneal, warm, L, M, W, A, shape)


def constant_curve(value: float, *, func: str = "constant_curve") -> Curve:
    r"""``lambda(t) = value`` for every ``t``.

    >>> constant_curve(0.5)(123)
    0.5
    """
    return partial(_constant, check_real(value, "value", func=func))


# --- the built-in curves, one per built-in schedule of the same name -------------------


def cosine_annealing_with_warmup(
    warmup_to_value: float, anneal_to_value: float, num_warmup_steps: int, num_training_steps: int
) -> Curve:
    """Linear warmup ``W t / L``, then half-cosine from ``W`` to ``A`` at ``M``, then ``A``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    return _warmup_anneal("cosine_annealing_with_warmup", "cosine", "normal", *steps, 1.0, 20.0)


def cosine_annealing_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
) -> Curve:
    """Inverse warmup ``W (R - (R-1) t / L)`` down to ``W``, then half-cosine to ``A``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name = "cosine_annealing_with_inverse_warmup"
    return _warmup_anneal(name, "cosine", "inverse", *steps, 1.0, warmup_multiplier)


def polynomial_schedule_with_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    polynomial_exponent: float = 2.0,
) -> Curve:
    """Linear warmup ``W t / L``, then ``A + (W - A)(1 - p)^P``, then ``A``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name = "polynomial_schedule_with_warmup"
    return _warmup_anneal(name, "polynomial", "normal", *steps, polynomial_exponent, 20.0)


def polynomial_schedule_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    polynomial_exponent: float = 2.0,
    warmup_multiplier: float = 20.0,
) -> Curve:
    """Inverse warmup ``W (R - (R-1) t / L)``, then ``A + (W - A)(1 - p)^P``, then ``A``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name, P, R = "polynomial_schedule_with_inverse_warmup", polynomial_exponent, warmup_multiplier
    return _warmup_anneal(name, "polynomial", "inverse", *steps, P, R)


def linear_schedule_with_warmup(
    warmup_to_value: float, anneal_to_value: float, num_warmup_steps: int, num_training_steps: int
) -> Curve:
    """The polynomial schedule with ``P = 1``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    return _warmup_anneal("linear_schedule_with_warmup", "polynomial", "normal", *steps, 1.0, 20.0)


def linear_schedule_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
) -> Curve:
    """The polynomial schedule with inverse warmup and ``P = 1``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name = "linear_schedule_with_inverse_warmup"
    return _warmup_anneal(name, "polynomial", "inverse", *steps, 1.0, warmup_multiplier)


def quadratic_schedule_with_warmup(
    warmup_to_value: float, anneal_to_value: float, num_warmup_steps: int, num_training_steps: int
) -> Curve:
    """The polynomial schedule with ``P = 2``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name = "quadratic_schedule_with_warmup"
    return _warmup_anneal(name, "polynomial", "normal", *steps, 2.0, 20.0)


def quadratic_schedule_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
) -> Curve:
    """The polynomial schedule with inverse warmup and ``P = 2``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name = "quadratic_schedule_with_inverse_warmup"
    return _warmup_anneal(name, "polynomial", "inverse", *steps, 2.0, warmup_multiplier)


def sqrt_schedule_with_warmup(
    warmup_to_value: float, anneal_to_value: float, num_warmup_steps: int, num_training_steps: int
) -> Curve:
    """The polynomial schedule with ``P = 0.5``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    return _warmup_anneal("sqrt_schedule_with_warmup", "polynomial", "normal", *steps, 0.5, 20.0)


def sqrt_schedule_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
) -> Curve:
    """The polynomial schedule with inverse warmup and ``P = 0.5``."""
    steps = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    name = "sqrt_schedule_with_inverse_warmup"
    return _warmup_anneal(name, "polynomial", "inverse", *steps, 0.5, warmup_multiplier)


def constant_with_warmup(warmup_to_value: float, num_warmup_steps: int) -> Curve:
    """Linear warmup ``W t / L``, then ``W``."""
    steps = warmup_to_value, warmup_to_value, num_warmup_steps, 0
    return _warmup_anneal("constant_with_warmup", "constant", "normal", *steps, 1.0, 20.0)


def constant_with_inverse_warmup(
    warmup_to_value: float, num_warmup_steps: int, warmup_multiplier: float = 20.0
) -> Curve:
    """Inverse warmup ``W (R - (R-1) t / L)``, then ``W``."""
    steps = warmup_to_value, warmup_to_value, num_warmup_steps, 0
    name = "constant_with_inverse_warmup"
    return _warmup_anneal(name, "constant", "inverse", *steps, 1.0, warmup_multiplier)


def constant_schedule(value: float) -> Curve:
    """``lambda(t) = value``."""
    return constant_curve(value, func="constant_schedule")


def warmup_stable_decay(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    num_decay_steps: int,
    decay_shape: DecayShape = "linear",
) -> Curve:
    r"""Warmup, a stable phase at ``W``, then a decay to ``A`` over the last ``D`` steps.

    .. math::

        \lambda(t) = \begin{cases}
            W t / L & t < L \\
            W & L \le t < S \\
            A + (W - A) \cdot \mathrm{shape}(p) & S \le t < M \\
            A & t \ge M
        \end{cases}

    ``shape(p)`` is ``1 - p`` (linear), ``(1 + cos(pi p)) / 2`` (cosine) or ``1 - sqrt(p)``
    (sqrt); ``S = M - D`` with ``0 <= D <= M - L``, and ``p = (t - S) / D``.

    >>> [round(warmup_stable_decay(1.0, 0.0, 2, 6, 2)(t), 3) for t in range(8)]
    [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    func = "warmup_stable_decay"
    W = check_real(warmup_to_value, "warmup_to_value", func=func)
    L = check_integer(num_warmup_steps, "num_warmup_steps", min=0, func=func)
    A, M = _anneal_end(func, anneal_to_value, num_training_steps, L)
    D = check_integer(num_decay_steps, "num_decay_steps", min=0, func=func)
    if D > M - L:
        expected = f"an integer <= num_training_steps - num_warmup_steps ({M - L})"
        raise ArgumentValueError(func, "num_decay_steps", D, expected)
    if not isinstance(decay_shape, str) or decay_shape not in _DECAY_SHAPES:
        raise ArgumentValueError(func, "decay_shape", decay_shape, "'linear', 'cosine' or 'sqrt'")
    # The stable phase is the constant tail of the warmup; the decay is an anneal from S.
    warm_then_stable = partial(_then_constant, partial(_linear_warmup, W, L), L, W)
    return partial(_then_anneal, warm_then_stable, M - D, M, W, A, _DECAY_SHAPES[decay_shape])


def _warmup_anneal(
    func: str,
    anneal: AnnealKind,
    warmup: WarmupKind,
    W: float,
    A: float,
    L: int,
    M: int,
    P: float,
    R: float,
) -> Curve:
    return warmup_anneal_curve(
        warmup_to_value=W,
        anneal_to_value=A,
        num_warmup_steps=L,
        num_training_steps=M,
        anneal=anneal,
        warmup=warmup,
        polynomial_exponent=P,
        warmup_multiplier=R,
        func=func,
    )


BUILTIN_CURVES: dict[str, Callable[..., Curve]] = {
    "cosine_annealing_with_warmup": cosine_annealing_with_warmup,
    "cosine_annealing_with_inverse_warmup": cosine_annealing_with_inverse_warmup,
    "polynomial_schedule_with_warmup": polynomial_schedule_with_warmup,
    "polynomial_schedule_with_inverse_warmup": polynomial_schedule_with_inverse_warmup,
    "linear_schedule_with_warmup": linear_schedule_with_warmup,
    "linear_schedule_with_inverse_warmup": linear_schedule_with_inverse_warmup,
    "quadratic_schedule_with_warmup": quadratic_schedule_with_warmup,
    "quadratic_schedule_with_inverse_warmup": quadratic_schedule_with_inverse_warmup,
    "sqrt_schedule_with_warmup": sqrt_schedule_with_warmup,
    "sqrt_schedule_with_inverse_warmup": sqrt_schedule_with_inverse_warmup,
    "constant_with_warmup": constant_with_warmup,
    "constant_with_inverse_warmup": constant_with_inverse_warmup,
    "constant_schedule": constant_schedule,
    "warmup_to_constant": constant_with_warmup,
    "warmup_stable_decay": warmup_stable_decay,
}
"""Every built-in schedule's curve by the built-in's name (``warmup_to_constant`` is the
alias of ``constant_with_warmup``)."""


# --- the pieces every curve is joined from ---------------------------------------------


def _anneal_end(func: str, A: float, M: int, L: int) -> tuple[float, int]:
    """Check the anneal's end: ``A`` finite, ``M`` an integer > 0 and >= ``L``."""
    A = check_real(A, "anneal_to_value", func=func)
    M = check_integer(M, "num_training_steps", min=0, func=func)
    if M == 0:
        raise ArgumentValueError(func, "num_training_steps", M, "an integer > 0 when annealing")
    if M < L:
        expected = f"an integer >= num_warmup_steps ({L})"
        raise ArgumentValueError(func, "num_training_steps", M, expected)
    return A, M


_DECAY_SHAPES: dict[str, Shape] = {
    "linear": _linear_shape,
    "cosine": _cosine_shape,
    "sqrt": _sqrt_shape,
}
