"""Gradient arithmetic on plain tensors and on FSDP2's sharded DTensor gradients.

Everything works on each rank's *local* gradient storage (``DTensor.to_local()`` is the
shard itself, not a copy), so scaling and norms cost no communication; the one
collective a decision needs is made by the controller from the numbers returned here.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def is_dtensor(t: Tensor) -> bool:
    # No tensor is a DTensor until torch.distributed.tensor has been imported (FSDP2
    # imports it), so this check imports nothing: importing it costs about a second of
    # start-up in every process, most of which never shard a model.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_grads(model: nn.Module) -> list[Tensor]:
    """This rank's gradient storage for every parameter that has a gradient."""
    return grads_of(model.parameters())


def grads_of(params: Iterable[Tensor]) -> list[Tensor]:
    """This rank's gradient storage for each of ``params`` that has a gradient."""
    with torch.no_grad():
        return [
            p.grad.to_local() if is_dtensor(p.grad) else p.grad
            for p in params
            if p.grad is not None
        ]


def _norms(tensors: list[Tensor], device: torch.device | None = None) -> Tensor:
    """Per-tensor 2-norms as one float64 vector on ``device`` (default: the first tensor's),
    computed with ``_foreach_norm`` per device and dtype."""
    device = device or (tensors[0].device if tensors else torch.device("cpu"))
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    if len(groups) == 1:  # the usual case: no scatter back into input order
        return torch.stack(torch._foreach_norm(tensors)).to(device=device, dtype=torch.float64)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    for indices in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in indices])
        out[indices] = torch.stack(norms).to(device=device, dtype=torch.float64)
    return out


def _replicas(grad: Tensor) -> int:
    """How many ranks of the DTensor's mesh hold each element (the Replicate dims)."""
    mesh = grad.device_mesh  # type: ignore[attr-defined]
    count = 1
    for dim, placement in enumerate(grad.placements):  # type: ignore[attr-defined]
        if placement.is_replicate():
            count *= mesh.size(dim)
    return count


def squared_norms(model: nn.Module, plain_grads_sharded: bool) -> tuple[Tensor, Tensor]:
    """This rank's share of ``‖grad‖²`` over ``model``'s parameters (see
    :func:`param_squared_norms`)."""
    return param_squared_norms(model.parameters(), plain_grads_sharded)


def param_squared_norms(
    params: Iterable[Tensor], plain_grads_sharded: bool
) -> tuple[Tensor, Tensor]:
    """This rank's share of ``‖grad‖²`` over ``params``, split into ``(sharded,
    replicated)`` parts.

    The global squared norm is the sharded part summed over ranks plus the replicated
    part of any one rank. DTensor shards are sharded (an element held by r replicas
    counts 1/r per holder); plain tensors are sharded only for FSDP1's flat shards.
    Both are 0-d float64 tensors; a NaN or inf gradient makes them non-finite.
    """
    sharded: list[Tensor] = []
    weights: list[float] = []
    replicated: list[Tensor] = []
    with torch.no_grad():
        for p in params:
            g = p.grad
            if g is None:
                continue
            if is_dtensor(g):
                sharded.append(g.to_local())
                weights.append(1.0 / _replicas(g))
            elif plain_grads_sharded:
                sharded.append(g)
                weights.append(1.0)
            else:
                replicated.append(g)
        first = sharded[0] if sharded else replicated[0] if replicated else None
        device = torch.device("cpu") if first is None else first.device  # both parts here
        return _sum_of_squares(sharded, weights, device), _sum_of_squares(replicated, None, device)


def _sum_of_squares(
    tensors: list[Tensor], weights: list[float] | None, device: torch.device
) -> Tensor:
    if not tensors:  # skip the kernels: plain/DDP models have no sharded part, FSDP2 no other
        return torch.zeros((), dtype=torch.float64, device=device)
    squares = _norms(tensors, device=device).square()
    if weights is not None and any(w != 1.0 for w in weights):
        squares = squares * torch.tensor(weights, dtype=torch.float64, device=device)
    return squares.sum()


def all_finite(grads: list[Tensor]) -> bool:
    """Whether every local gradient element is finite (one pass, one host sync).

    A finite 2-norm proves it; only a non-finite one (NaN, inf, or an overflow of huge
    but finite values) pays for the exact elementwise check.
    """
    if not grads or bool(_norms(grads).isfinite().all()):
        return True
    with torch.no_grad():
        return all(bool(torch.isfinite(g).all()) for g in grads)


def divide_(grads: list[Tensor], divisor: float) -> None:
    """Divide every local gradient in place by ``divisor`` (accumulated sum to mean)."""
    if divisor == 1.0 or not grads:
        return
    with torch.no_grad():
        for tensors in _by_device_and_dtype(grads):
            torch._foreach_div_(tensors, divisor)


def scale_(grads: list[Tensor], factor: float) -> None:
    """Multiply every local gradient in place by ``factor`` (as ``clip_grad_norm_`` does:
    a multiplication, which a division by ``1 / factor`` would not round the same)."""
    with torch.no_grad():
        for tensors in _by_device_and_dtype(grads):
            torch._foreach_mul_(tensors, factor)


def _by_device_and_dtype(grads: list[Tensor]) -> list[list[Tensor]]:
    """``grads`` split by (device, dtype), the lists a ``_foreach`` kernel accepts."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    return list(groups.values())
