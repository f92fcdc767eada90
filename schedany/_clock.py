"""The training clock: optimizer steps, samples and tokens seen since training began.

A reactive control loop changes how much data one optimizer step consumes, so a
schedule may count samples or tokens instead of steps (``docs/clock.md``). The clock is
advanced once per optimizer step with that step's global counts; a
:class:`~schedany.SynchronousSchedule` built with it brings each member to the clock's
reading in the member's own unit.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from .errors import ArgumentValueError, check_integer

Unit = Literal["steps", "samples", "tokens"]
UNITS: tuple[str, ...] = get_args(Unit)


def check_unit(unit: Any, func: str) -> Unit:
    """``unit`` if it is one of :data:`UNITS`, else an :class:`ArgumentValueError`."""
    if not isinstance(unit, str) or unit not in UNITS:
        raise ArgumentValueError(func, "unit", unit, "one of " + ", ".join(UNITS))
    return unit  # type: ignore[return-value]


class Clock:
    """Totals since the start of training: optimizer steps, samples and tokens.

    >>> clock = Clock()
    >>> clock.advance(samples=8, tokens=1000)
    >>> clock.advance(samples=16, tokens=1900)
    >>> clock.steps, clock.samples, clock.tokens, clock.read("tokens")
    (2, 24, 2900, 2900)
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        # [steps, samples, tokens], in UNITS order: one list for the clock's life (only
        # ever changed in place), because a SynchronousSchedule holds it and reads it by
        # position once per member per step (see SynchronousSchedule.step).
        self._counts = [0, 0, 0]

    def advance(self, samples: int = 0, tokens: int = 0) -> None:
        """One optimizer step that consumed ``samples`` and ``tokens``, summed over all
        ranks. Call it after ``optimizer.step()`` and before ``schedule.step()``."""
        if not (type(samples) is int and type(tokens) is int and samples >= 0 and tokens >= 0):
            # The full check (numpy integers, bools, negatives) only off the fast path.
            samples = check_integer(samples, "samples", min=0, func="Clock.advance")
            tokens = check_integer(tokens, "tokens", min=0, func="Clock.advance")
        counts = self._counts
        counts[0] += 1
        counts[1] += samples
        counts[2] += tokens

    @property
    def steps(self) -> int:
        return self._counts[0]

    @property
    def samples(self) -> int:
        return self._counts[1]

    @property
    def tokens(self) -> int:
        return self._counts[2]

    def read(self, unit: Unit) -> int:
        """The total in ``unit``: ``"steps"``, ``"samples"`` or ``"tokens"``."""
        return self._counts[UNITS.index(check_unit(unit, "Clock.read"))]

    def state_dict(self) -> dict[str, int]:
        return dict(zip(UNITS, self._counts))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Strict: exactly the keys steps, samples, tokens, each an integer >= 0."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(UNITS):
            got = sorted(state_dict) if isinstance(state_dict, dict) else state_dict
            raise KeyError(f"Clock.load_state_dict: expected keys {sorted(UNITS)}, got {got}")
        # In place: a SynchronousSchedule built on this clock holds the list itself.
        self._counts[:] = [
            check_integer(state_dict[unit], unit, min=0, func="Clock.load_state_dict")
            for unit in UNITS
        ]

    def __repr__(self) -> str:
        return f"Clock(steps={self.steps}, samples={self.samples}, tokens={self.tokens})"
