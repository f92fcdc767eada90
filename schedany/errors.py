"""Typed errors for bad arguments, and the checks that raise them.

A message is written once, where the check is, from the fields the error carries; a
caller that needs other words (the config names a dotted path, not an argument) reads
the fields instead of parsing the text:

>>> try:
...     check_integer(-5, "num_warmup_steps", min=0, func="constant_with_warmup")
... except ArgumentError as error:
...     print(error)
...     print(error.argument, error.value, error.expected)
constant_with_warmup requires num_warmup_steps to be an integer >= 0, got num_warmup_steps=-5
num_warmup_steps -5 an integer >= 0

Every error here is also a ``ValueError``, ``TypeError`` or ``KeyError``, so code that
catches the builtin kinds keeps working. This module does not import torch.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "TargetError",
    "TargetKeyError",
    "TargetTypeError",
    "TargetValueError",
    "check_integer",
    "check_real",
    "closest",
    "is_integer",
    "is_real",
]


class ArgumentError(Exception):
    """An argument outside what a function accepts.

    Attributes:
        func: the public function whose argument it is (``""`` when none applies).
        argument: the argument's name.
        value: the value given.
        expected: what it must be, as a noun phrase (``"an integer >= 0"``).
    """

    def __init__(self, func: str, argument: str, value: Any, expected: str) -> None:
        super().__init__(func, argument, value, expected)
        self.func, self.argument, self.value, self.expected = func, argument, value, expected

    def __str__(self) -> str:
        subject = f"{self.func} requires" if self.func else "requires"
        return (
            f"{subject} {self.argument} to be {self.expected}, got {self.argument}={self.value!r}"
        )


class ArgumentValueError(ArgumentError, ValueError):
    """The right type, out of bounds (or out of step with another argument)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """Not the right type at all (a string for a number, a bool for a count)."""


class TargetError(Exception):
    """A schedule target (``"weight_decay"``, ``"betas[0]"``) the optimizer cannot serve.

    Attributes:
        argument: the argument that named the target (``"schedule_target"``).
        target: the target as given.
        problem: what is wrong, without the target's name.
        missing_key: the param_group key that is absent, when that is the problem; the
            caller's words say how to add one (``hint`` holds the library's).
        hint: the library's advice, appended to the message (may be ``""``).
    """

    def __init__(
        self,
        argument: str,
        target: Any,
        problem: str,
        *,
        missing_key: str | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(argument, target, problem)
        self.argument, self.target, self.problem = argument, target, problem
        self.missing_key, self.hint = missing_key, hint

    def __str__(self) -> str:
        hint = f" {self.hint}" if self.hint else ""
        return f"{self.argument}={self.target!r}: {self.problem}{hint}"


class TargetKeyError(TargetError, KeyError):
    """A param group lacks the target's key."""


class TargetTypeError(TargetError, TypeError):
    """The target is not a string, or its value is not a real scalar."""


class TargetValueError(TargetError, ValueError):
    """The target is malformed, its index out of range, or it cannot be scheduled so."""


def is_integer(value: Any) -> bool:
    """An integer: a Python or numpy int, never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real scalar: a Python or numpy int or float, never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bounded(what: str, min: float | None, gt: float | None, lt: float | None = None) -> str:
    """``"an integer >= 0"``, ``"a finite number > 0"``, ``"a number in (0, 1)"``."""
    if gt is not None and lt is not None:
        return f"a number in ({gt:g}, {lt:g})"
    bounds = [f"{op} {b}" for op, b in ((">=", min), (">", gt), ("<", lt)) if b is not None]
    return " and ".join([f"{what} {bounds[0]}", *bounds[1:]]) if bounds else what


def check_integer(
    value: Any, argument: str, *, min: int | None = None, gt: int | None = None, func: str = ""
) -> int:
    """``value`` as an ``int`` if it is an integer (numpy's too, never a bool) within
    the bounds (``min`` inclusive, ``gt`` exclusive); else an :class:`ArgumentError`."""
    expected = _bounded("an integer", min, gt)
    if not is_integer(value):
        raise ArgumentTypeError(func, argument, value, expected)
    if (min is not None and value < min) or (gt is not None and value <= gt):
        raise ArgumentValueError(func, argument, value, expected)
    return int(value)


def check_real(
    value: Any,
    argument: str,
    *,
    min: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    func: str = "",
) -> float:
    """``value`` if it is a finite real number (never a bool) within the bounds (``min``
    inclusive, ``gt`` and ``lt`` exclusive); else an :class:`ArgumentError`."""
    expected = _bounded("a finite number", min, gt, lt)
    if not is_real(value):
        raise ArgumentTypeError(func, argument, value, expected)
    if (
        not math.isfinite(value)
        or (min is not None and value < min)
        or (gt is not None and value <= gt)
        or (lt is not None and value >= lt)
    ):
        raise ArgumentValueError(func, argument, value, expected)
    return value


def closest(word: Any, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` was most likely meant to be (same letters in another case
    first, then the closest spelling), or None; each caller words its own hint."""
    candidates = list(candidates)
    same_case = [c for c in candidates if c.lower() == str(word).lower()]
    close = same_case or difflib.get_close_matches(str(word), candidates, n=1)
    return close[0] if close else None
