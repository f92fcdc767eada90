"""The numbers a controller decides a micro-step from (shared by the protocol and the
noise scale, which reads them)."""

from __future__ import annotations

import math
from typing import NamedTuple


class Tally(NamedTuple):
    """What a controller decides a micro-step from; the same numbers on every rank."""

    micro_steps: int
    """Micro-steps of the logical batch, the current one included."""
    items: int
    """Items of the logical batch over all ranks, the current micro-step's included."""
    target: float
    """The scheduled value, read when the logical batch started."""
    mean_divisor: float
    """What turns the accumulated ``.grad`` into the mean: ``items / W`` with num_items
    (DDP/FSDP already averaged over the ``W`` ranks), else ``micro_steps``."""
    sum_of_squares: float = math.nan
    """``‖S‖²`` of the accumulated gradient over all ranks and shards; only measured for
    a controller with ``measures_gradients``."""

    @property
    def grad_norm(self) -> float:
        """``‖mean gradient‖₂``: nan while there are no items to take the mean over, inf
        or nan when the gradients are not finite."""
        norm = math.sqrt(self.sum_of_squares)
        if not math.isfinite(norm):
            return norm
        return norm / self.mean_divisor if self.items else math.nan
