r"""Schedule curves as pure ``step -> multiplier`` functions.

This module does not import torch: a curve is plain arithmetic on the number of
``step()`` calls ``t`` since the schedule was built. The built-in schedules wrap
a curve in a ``LambdaLR`` bound to the chosen optimizer key, so the scheduled
value is ``initial_value * curve(t)``.

Notation (shared by every curve; see ``docs/api.md``):
``W`` = ``warmup_to_value``, ``A`` = ``anneal_to_value``, ``L`` = ``num_warmup_steps``,
``M`` = ``num_training_steps``, ``P`` = ``polynomial_exponent``,
``R`` = ``warmup_multiplier``.

Every curve is one warmup phase joined to one anneal phase:

.. math::

    \lambda(t) = \begin{cases}
        \text{warmup}(t) & t < L \\
        A + (W - A)\,\text{shape}(p),\quad p = \frac{t - L}{M - L} & L \le t \le M \\
        A & t > M
    \end{cases}

with ``p = 1`` when ``M = L``. Warmups: normal ``W t / L``; inverse
``W (R - (R - 1) t / L)``. Shapes: cosine ``(1 + cos(pi p)) / 2``; polynomial
``(1 - p)^P``; constant ``1`` (then ``A = W``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

__all__ = [
    "Curve",
    "WarmupKind",
    "AnnealKind",
    "warmup_anneal_curve",
    "constant_curve",
]

Curve = Callable[[int], float]
WarmupKind = Literal["normal", "inverse"]
AnnealKind = Literal["cosine", "polynomial", "constant"]


def _check_finite(func: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{func} requires a real number for {name}, got {name}={value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{func} requires a finite {name}, got {name}={value!r}")


def _check_steps(func: str, **steps: int) -> None:
    for name, value in steps.items():
        # numbers.Integral admits numpy integers (what samplers such as Ray Tune return).
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{func} requires an integer {name}, got {name}={value!r}")
        if value < 0:
            raise ValueError(f"{func} requires {name} >= 0, got {name}={value}")


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
            W t / L \;\text{(normal)} \;\;\text{or}\;\; W (R - (R-1) t / L) \;\text{(inverse)} & t < L \\
            A + (W - A) \cdot \tfrac12 (1 + \cos \pi p) \;\text{(cosine)} & L \le t \le M \\
            A + (W - A) (1 - p)^P \;\text{(polynomial)} & L \le t \le M \\
            A & t > M
        \end{cases}

    ``p = (t - L) / (M - L)``, and ``p = 1`` when ``M = L``. ``anneal="constant"``
    uses ``lambda = W`` for ``t >= L`` and ignores ``A``, ``M`` and ``P``.

    ``func`` names the public function in error messages.

    >>> curve = warmup_anneal_curve(warmup_to_value=1.0, anneal_to_value=0.0,
    ...                             num_warmup_steps=2, num_training_steps=4)
    >>> [round(curve(t), 3) for t in range(6)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    W, A, L, M = warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps
    P, R = polynomial_exponent, warmup_multiplier
    _check_finite(func, warmup_to_value=W, anneal_to_value=A)
    _check_steps(func, num_warmup_steps=L)
    L = int(L)
    if warmup == "inverse":
        _check_finite(func, warmup_multiplier=R)
        if R < 1:
            raise ValueError(f"{func} requires warmup_multiplier >= 1, got warmup_multiplier={R}")
    elif warmup != "normal":
        raise ValueError(f"{func}: unknown warmup kind {warmup!r}; expected 'normal' or 'inverse'")

    if anneal == "constant":
        A, M, shape = W, L, None
    else:
        _check_steps(func, num_training_steps=M)
        M = int(M)
        if M <= 0:
            raise ValueError(
                f"{func} requires num_training_steps > 0 when annealing, got num_training_steps={M}"
            )
        if M < L:
            raise ValueError(
                f"{func} requires num_training_steps >= num_warmup_steps, "
                f"got num_training_steps={M} < num_warmup_steps={L}"
            )
        if anneal == "cosine":
            shape = _cosine_shape
        elif anneal == "polynomial":
            _check_finite(func, polynomial_exponent=P)
            if P <= 0:
                raise ValueError(
                    f"{func} requires polynomial_exponent > 0, got polynomial_exponent={P}"
                )
            shape = _polynomial_shape(P)
        else:
            raise ValueError(
                f"{func}: unknown anneal kind {anneal!r}; expected 'cosine', 'polynomial' or 'constant'"
            )

    # Constants are bound as defaults so the hot call does no closure lookups.
    if warmup == "normal":

        def warm(t: int, W: float = W, L: int = L) -> float:
            return W * t / L

    else:

        def warm(t: int, W: float = W, L: int = L, R: float = R) -> float:
            return W * (R - (R - 1.0) * t / L)

    if shape is None:

        def curve(t: int, L: int = L, W: float = W, warm: Curve = warm) -> float:
            return warm(t) if t < L else W

        return curve

    span = M - L

    def curve(
        t: int, L: int = L, M: int = M, W: float = W, A: float = A, span: int = span,
        warm: Curve = warm, shape: Callable[[float], float] = shape,
    ) -> float:
        if t < L:
            return warm(t)
        if t >= M:
            return A  # p = 1 at t = M and the tail is clamped after it
        return A + (W - A) * shape((t - L) / span)

    return curve


def constant_curve(value: float, *, func: str = "constant_curve") -> Curve:
    r"""``lambda(t) = value`` for every ``t``.

    >>> constant_curve(0.5)(123)
    0.5
    """
    _check_finite(func, value=value)

    def curve(t: int, value: float = value) -> float:
        return value

    return curve


def _cosine_shape(p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _polynomial_shape(power: float) -> Callable[[float], float]:
    def shape(p: float) -> float:
        return (1.0 - p) ** power

    return shape
