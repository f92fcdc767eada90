"""Requests that must take effect at the same optimizer step on every rank.

A preemption signal reaches each rank at its own moment, and a live-control edit is
seen by rank 0 alone; acting on either where it was seen would let the ranks part ways
(one checkpoints a step the others never take). So a request is only *raised* locally,
and :meth:`StepFlags.agree`, called by every rank at the same point of every optimizer
step, tells all of them which requests were raised anywhere: one all-reduce of a few
integers under ``torchrun``, nothing in one process. Per-step counts that every rank
needs summed (the clock's tokens) ride on the same all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist


class Agreement(NamedTuple):
    raised: frozenset[str]
    """The flags raised on any rank."""
    sums: tuple[int, ...]
    """The ``sums`` given to :meth:`StepFlags.agree`, summed over all ranks."""


class StepFlags:
    """Named boolean requests, raised on any rank, agreed on by all of them."""

    def __init__(self, *names: str, device: torch.device | str = "cpu") -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"StepFlags needs distinct flag names, got {names!r}")
        self.names = names
        # One dict entry per flag: raising one from a signal handler is a single store,
        # so it cannot lose another flag raised meanwhile.
        self._raised = dict.fromkeys(names, False)
        self._device = device

    def raise_flag(self, name: str) -> None:
        """Request ``name`` here; safe to call from a signal handler."""
        if name not in self._raised:
            raise KeyError(f"unknown step flag {name!r}; known: {', '.join(self.names)}")
        self._raised[name] = True

    def lower(self, name: str) -> None:
        """Withdraw this rank's request (its owner has acted on it)."""
        self._raised[name] = False

    def agree(self, sums: Sequence[int] = ()) -> Agreement:
        """The flags raised on any rank, and ``sums`` summed over all ranks. Every rank
        must call it at the same point of the same optimizer step, with as many sums
        (it is one all-reduce under ``torchrun``)."""
        raised = [int(self._raised[name]) for name in self.names]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Agreement(self._names_of(raised), tuple(sums))
        # One SUM serves both: a flag is raised somewhere when its sum is positive.
        buffer = torch.tensor([*raised, *sums], dtype=torch.int64, device=self._device)
        dist.all_reduce(buffer)
        values = buffer.tolist()  # the one host sync
        return Agreement(self._names_of(values[: len(raised)]), tuple(values[len(raised) :]))

    def _names_of(self, counts: Sequence[int]) -> frozenset[str]:
        return frozenset(name for name, count in zip(self.names, counts) if count > 0)
