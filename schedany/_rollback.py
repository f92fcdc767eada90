"""Leave an optimizer as it was when a change to it fails half-way.

Binding a schedule, loading schedule state and building a schedule from a config
each touch param_groups and defaults in several steps; any of them can fail after
the first write. The promise is the same everywhere: on error, nothing is lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

_Snapshot = tuple[dict[str, Any], list[dict[str, tuple[Any, Any]]]]


@contextlib.contextmanager
def unchanged_on_error(optimizer: Optimizer) -> Iterator[None]:
    """On any exception in the block, restore ``optimizer.defaults`` and every param
    group (keys added removed, values put back, tensors refilled in place), then re-raise."""
    snapshot = _snapshot(optimizer)
    try:
        yield
    except BaseException:
        _restore(optimizer, snapshot)
        raise


def _snapshot(optimizer: Optimizer) -> _Snapshot:
    """Defaults and each group's items; tensors also as a clone, since schedulers
    fill_ them in place."""
    groups = [
        {k: (v, v.clone() if isinstance(v, Tensor) else None) for k, v in group.items()}
        for group in optimizer.param_groups
    ]
    return dict(optimizer.defaults), groups


def _restore(optimizer: Optimizer, snapshot: _Snapshot) -> None:
    defaults, groups = snapshot
    optimizer.defaults.clear()
    optimizer.defaults.update(defaults)
    for group, saved in zip(optimizer.param_groups, groups):
        for key in [k for k in group if k not in saved]:
            del group[key]
        for key, (value, tensor_copy) in saved.items():
            if tensor_copy is not None:
                value.copy_(tensor_copy)
            group[key] = value
