"""The argument checks both controllers share: scheduled values, counts and num_items.

They accept what a training loop naturally holds: a one-element tensor, and any real
number or integer as :mod:`schedany.errors` defines them (numpy scalars included, never a
bool); counts are checked with :func:`schedany.errors.check_integer`.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from .._targets import did_you_mean
from ..errors import check_integer, is_real


def read_scheduled_value(optimizer: Optimizer, key: str, owner: str) -> float:
    """The max over param groups of ``group[key]`` (groups without the key are skipped)."""
    value = max(v for v in read_group_values(optimizer, key, owner) if v is not None)
    if math.isnan(value):
        raise ValueError(f"{owner}: the scheduled {key!r} is nan (max over param groups)")
    return value


def read_group_values(
    optimizer: Optimizer, key: str, owner: str, *, minimum: float | None = None
) -> list[float | None]:
    """``group[key]`` of every param group as a float, ``None`` where a group lacks it.

    A value that is not a real number is a ``TypeError``; with ``minimum``, one below it
    (or nan) is a ``ValueError``; a key that no group holds is a ``KeyError``. Each
    names the group, the key and the value.
    """
    values: list[float | None] = []
    for i, group in enumerate(optimizer.param_groups):
        if key not in group:
            values.append(None)
            continue
        value = group[key]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        where = f"optimizer.param_groups[{i}][{key!r}]"
        if not is_real(value):
            raise TypeError(f"{owner}: {where} must be a real number, got {value!r}")
        value = float(value)
        if minimum is not None and not value >= minimum:  # nan fails too
            raise ValueError(f"{owner}: {where} must be a number >= {minimum:g}, got {value!r}")
        values.append(value)
    if all(v is None for v in values):
        keys = sorted({k for group in optimizer.param_groups for k in group if k != "params"})
        raise KeyError(
            f"{owner}: key={key!r} is in no optimizer param group (keys: {keys})"
            f"{did_you_mean(key, keys)} "
            f"Add it first: schedany.extend_optimizer(optimizer, {key!r}, initial_value)"
        )
    return values


def check_optional_count(value: Any, name: str, owner: str) -> None:
    """Reject ``value`` unless it is ``None`` or an integer >= 1."""
    if value is not None:
        check_integer(value, name, min=1, func=owner)


def check_num_items(num_items: Any, owner: str) -> int | None:
    """``num_items`` of ``owner.accumulate()`` as an int (a 0-d integer tensor counts), or
    None; rejects the rest."""
    if (
        isinstance(num_items, Tensor)
        and num_items.numel() == 1
        and not num_items.is_floating_point()
    ):
        num_items = int(num_items.item())
    if num_items is None:
        return None
    return check_integer(num_items, "num_items", min=0, func=f"{owner}.accumulate")


def check_state_keys(state_dict: Any, keys: set[str] | frozenset[str], where: str) -> None:
    """A ``load_state_dict`` is strict: exactly ``keys``, else a ``KeyError`` naming
    ``where`` (``"GradientGuard.load_state_dict"``) and what is missing or unknown."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{where}: expected a dict, got {type(state_dict).__name__}")
    missing, unknown = keys - state_dict.keys(), state_dict.keys() - keys
    if missing or unknown:
        raise KeyError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
