"""Requests that must take effect at the same optimizer step on every rank.

A preemption signal reaches each rank at its own moment, and a live-control edit is
seen by rank 0 alone; acting on either where it was seen would let the ranks part ways
(one checkpoints a step the others never take). So a request is only *raised* locally,
and :meth:`StepFlags.agree`, called by every rank at the same point of every optimizer
step, tells all of them which requests were raised anywhere: one all-reduce of a few
integers under ``torchrun``, nothing in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StepFlags:
    """Named boolean requests, raised on any rank, agreed on by all of them."""

    def __init__(self, *names: str, device: torch.device | str = "cpu") -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"StepFlags needs distinct flag names, got {names!r}")
        self.names = names
        # One dict entry per flag: raising one from a signal handler is a single store,
        # so it cannot lose another flag raised meanwhile.
        self._raised = dict.fromkeys(names, False)
        self._buffer = torch.zeros(len(names), dtype=torch.int32, device=device)

    def raise_flag(self, name: str) -> None:
        """Request ``name`` here; safe to call from a signal handler."""
        if name not in self._raised:
            raise KeyError(f"unknown step flag {name!r}; known: {', '.join(self.names)}")
        self._raised[name] = True

    def lower(self, name: str) -> None:
        """Withdraw this rank's request (its owner has acted on it)."""
        self._raised[name] = False

    def is_raised(self, name: str) -> bool:
        """Whether this rank has raised ``name`` (no communication)."""
        return self._raised[name]

    def agree(self) -> frozenset[str]:
        """The flags raised on any rank. Every rank must call it at the same point of
        the same optimizer step (it is a collective under ``torchrun``)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return frozenset(name for name, up in self._raised.items() if up)
        for i, name in enumerate(self.names):
            self._buffer[i] = int(self._raised[name])
        dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX)
        agreed = self._buffer.tolist()  # the one host sync
        return frozenset(name for name, up in zip(self.names, agreed) if up)
