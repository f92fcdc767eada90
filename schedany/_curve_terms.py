"""The terms the built-in curves are made of (``schedany.curves``), as module-level
functions so a curve built from them with ``functools.partial`` pickles and copies."""

from __future__ import annotations

import math
from collections.abc import Callable

Curve = Callable[[int], float]
Shape = Callable[[float], float]  # p in [0, 1] -> the fraction of W - A still left

# Each takes its parameters first and ``t`` (or ``p``) last: a curve binds the parameters
# with functools.partial.


def _constant(value: float, t: int) -> float:
    return value


def _linear_warmup(W: float, L: int, t: int) -> float:
    return W * t / L


def _inverse_warmup(W: float, L: int, R: float, t: int) -> float:
    return W * (R - (R - 1.0) * t / L)


def _then_constant(warm: Curve, L: int, W: float, t: int) -> float:
    return warm(t) if t < L else W


def _then_anneal(warm: Curve, L: int, M: int, W: float, A: float, shape: Shape, t: int) -> float:
    if t < L:
        return warm(t)
    if t >= M:
        return A  # p = 1 at t = M, and the tail is clamped after it
    return A + (W - A) * shape((t - L) / (M - L))


def _cosine_shape(p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _polynomial_shape(power: float, p: float) -> float:
    return (1.0 - p) ** power


def _linear_shape(p: float) -> float:
    return 1.0 - p


def _sqrt_shape(p: float) -> float:
    return 1.0 - math.sqrt(p)  # 1 - sqrt(p), not sqrt(1 - p) as in the sqrt anneal
