"""Add new hyperparameters to an optimizer and read them back per param group."""

from __future__ import annotations

from typing import Any

from torch.nn import Parameter
from torch.optim import Optimizer

from ._targets import did_you_mean, parse_target
from .errors import TargetKeyError


def extend_optimizer(
    optimizer: Optimizer, name: str, default_value: Any, overwrite_values: bool = False
) -> Optimizer:
    """Add the hyperparameter ``name`` to every param group (and to ``defaults``,
    so groups added later get it too).

    Groups that already hold ``name`` keep their value unless ``overwrite_values``.
    Returns the optimizer, so calls can be chained.

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
    for group in optimizer.param_groups:
        if overwrite_values or name not in group:
            group[name] = default_value
    if overwrite_values or name not in optimizer.defaults:
        optimizer.defaults[name] = default_value
    return optimizer


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
