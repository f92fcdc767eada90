"""The one place that knows how each wrapper turns gradient synchronization off.

Gradient accumulation saves communication by reducing gradients only on the micro-step
that closes a logical batch. Every wrapper spells "not this time" differently, and DDP
reads its flag in ``forward()`` while FSDP reads it in the post-backward hooks, so the
switch must cover the forward *and* the backward of the micro-step.

Reducing *after* a backward that ran with sync off is DDP-only
(:meth:`GradientSync.reduce_accumulated`): DDP arms its reducer in ``forward()``, so a
forward through a stand-in module that reaches every parameter, and a backward of zeros,
make DDP reduce what was accumulated, through its buckets and any registered comm hook.
FSDP has no such path: its reduce-scatter runs from the hooks of a real backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

ModelKind = Literal["plain", "ddp", "fsdp1", "fsdp2"]


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def model_kind(model: nn.Module) -> ModelKind:
    """How ``model`` synchronizes gradients: not at all, DDP, FSDP1 or FSDP2.

    FSDP2 is recognized when any submodule was ``fully_shard``-ed, so a root that was
    left unsharded still counts.
    """
    if not torch.distributed.is_available():
        return "plain"
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    if _fsdp2_modules(model):
        return "fsdp2"
    return "plain"


def plain_grads_sharded(model: nn.Module, kind: ModelKind) -> bool:
    """Whether ``model``'s plain-tensor gradients are per-rank shards: FSDP1's flat shards
    (every strategy but NO_SHARD). FSDP2's shards are DTensors, which say so themselves."""
    strategy = str(getattr(model, "sharding_strategy", "")).split(".")[-1]
    return kind == "fsdp1" and strategy != "NO_SHARD"


class _TouchEveryParameter(nn.Module):
    """Stands in for DDP's module for one forward: one output per parameter, each a
    function of the whole parameter, so a backward of zeros reaches every one of them."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.touched = params  # a plain list: not registered as this module's parameters

    def forward(self) -> list[torch.Tensor]:
        return [p.sum() for p in self.touched]  # sum's backward is an expand: no copy


class GradientSync:
    """Turns ``model``'s gradient synchronization off for one micro-step at a time.

    Built once per model (finding FSDP2 submodules walks the whole module tree).

    >>> sync = GradientSync(torch.nn.Linear(2, 1))
    >>> sync.kind
    'plain'
    >>> with sync(enabled=False):
    ...     pass  # forward and backward of a micro-step that must not reduce gradients
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kind: ModelKind = model_kind(model)
        self._fsdp2 = _fsdp2_modules(model) if self.kind == "fsdp2" else []

    def reduce_accumulated(self) -> None:
        """DDP: average over ranks, now, the gradients accumulated with sync off.

        DDP has no call for this; its reducer is armed by a ``forward()`` with sync on
        and fires from the parameters' gradient hooks. So the module DDP wraps is swapped,
        for one forward, for a stand-in whose outputs reach every parameter (those with a
        gradient, if DDP looks for unused ones), and a backward of zeros adds 0 to each
        gradient: DDP's hooks see the accumulated gradients and all-reduce them once, in
        its buckets and through the user's comm hook, exactly as after ``no_sync()``.
        """
        if self.kind != "ddp":
            raise NotImplementedError(f"reduce_accumulated() needs DDP, got {self.kind}")
        ddp = self.model
        skip_unused = bool(getattr(ddp, "find_unused_parameters", False))
        params = [
            p
            for p in ddp.parameters()
            if p.requires_grad and (p.grad is not None or not skip_unused)
        ]
        wrapped = ddp.module
        ddp.module = _TouchEveryParameter(params)
        try:
            with torch.enable_grad():
                touched = ddp()
        finally:
            ddp.module = wrapped
        torch.autograd.backward(touched, [torch.zeros_like(t) for t in touched])

    @contextlib.contextmanager
    def __call__(self, enabled: bool) -> Iterator[None]:
        """Run the enclosed forward and backward with gradient sync on or off.

        ``enabled=True`` leaves the wrapper as it is (sync is every wrapper's default);
        ``enabled=False`` uses DDP's and FSDP1's ``no_sync()`` and FSDP2's
        ``set_requires_gradient_sync(False)``, switched back on when the block exits.
        A plain module has nothing to switch.
        """
        if enabled or self.kind == "plain":
            yield
        elif self.kind in ("ddp", "fsdp1"):
            # DDP's no_sync() clears require_backward_grad_sync, which forward() reads.
            with self.model.no_sync():  # type: ignore[operator]
                yield
        else:
            for module in self._fsdp2:
                module.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]
            try:
                yield
            finally:
                for module in self._fsdp2:
                    module.set_requires_gradient_sync(True, recurse=False)  # type: ignore[operator]
