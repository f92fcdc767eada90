"""Add new hyperparameters to an optimizer and read them back per param group."""

from __future__ import annotations

from typing import Any

from torch.nn import Parameter
from torch.optim import Optimizer

from ._targets import did_you_mean, is_numeric, parse_target
from .errors import ArgumentTypeError, TargetKeyError

_DEFAULT_VALUE = "a real number or a non-empty tuple/list of real numbers"


def extend_optimizer(
    optimizer: Optimizer, name: str, default_value: Any, overwrite_values: bool = False
) -> Optimizer:
    """Add the hyperparameter ``name`` to every param group (and to ``defaults``,
    so groups added later get it too).

    ``default_value`` is a real number (a one-element tensor too), or a tuple/list of
    them: a whole tuple key, so that ``"name[i]"`` can be scheduled. Anything else is an
    :class:`~schedany.errors.ArgumentTypeError` (a ``TypeError``), with the optimizer
    unchanged. Groups that already hold ``name`` keep their value unless
    ``overwrite_values``. Returns the optimizer, so calls can be chained.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> extend_optimizer(opt, "clip", 1.0).param_groups[0]["clip"]
    1.0
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(name, str) or not name or "[" in name or "]" in name:
        raise ValueError(
            "extend_optimizer: name must be a plain key such as 'gradient_norm_threshold', got "
            f"{name!r}"
        )
    if name == "params":
        raise ValueError(
            "extend_optimizer: name='params' is the optimizer's parameter list and cannot be "
            "extended"
        )
    if not _is_default_value(default_value):
        raise ArgumentTypeError(
            "extend_optimizer",
            "default_value",
            default_value,
            f"{_DEFAULT_VALUE} (the value of key {name!r})",
        )
    add_key(optimizer, name, default_value, overwrite_values)
    return optimizer


def _is_default_value(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(is_numeric(v) for v in value)
    return is_numeric(value)


def add_key(optimizer: Optimizer, name: str, value: Any, overwrite_values: bool = False) -> None:
    """What :func:`extend_optimizer` does once its arguments are checked.
    :func:`~schedany.arbitrary_schedule_factory` calls it directly: its target's own
    check (a real scalar there) names the target in the message."""
    for group in optimizer.param_groups:
        if overwrite_values or name not in group:
            group[name] = value
    if overwrite_values or name not in optimizer.defaults:
        optimizer.defaults[name] = value


def get_param_groups_regrouped_by_key(
    optimizer: Optimizer, schedule_target: str
) -> list[tuple[Any, list[Parameter], dict[str, Any]]]:
    """``(value, params, group)`` for every param group that holds ``schedule_target``.

    ``schedule_target`` may be an element target such as ``"betas[0]"``. Raises
    ``KeyError`` when no group holds it (a typo would otherwise do nothing).

    >>> import torch
    >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], betas=(0.8, 0.99))
    >>> [value for value, params, group in get_param_groups_regrouped_by_key(opt, "betas[0]")]
    [0.8]
    """
    target = parse_target(schedule_target)
    found = [
        (target.read(group), group["params"], group)
        for group in optimizer.param_groups
        if target.key in group
    ]
    if not found:
        keys = {k for group in optimizer.param_groups for k in group if k != "params"}
        raise TargetKeyError(
            "schedule_target",
            schedule_target,
            f"no param group holds {target.key!r} (keys: {sorted(keys)})"
            f"{did_you_mean(target.key, keys)}",
            missing_key=target.key,
        )
    return found
