"""Gradient accumulation to a scheduled logical batch size (paper, section 5.2)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ._protocol import AccumulationController, Mode, check_optional_count, read_scheduled_value

__all__ = ["LogicalBatchSize"]


class LogicalBatchSize(AccumulationController):
    r"""Accumulate micro-batches until the logical batch holds the scheduled item count.

    The target is ``max(group[key] for group in optimizer.param_groups)``, read when a
    logical batch starts. The batch closes on the first micro-step whose global item
    count :math:`N` (summed over all ranks) reaches it, and then ``.grad`` holds

    .. math::
        \bar g = \begin{cases}
            \frac{1}{N}\sum_{\text{items}} \nabla \ell_i & \text{with num\_items (loss is a sum)}\\
            \frac{1}{k W}\sum_{\text{micro-batches}} \nabla \bar\ell_j
                & \text{with micro\_batch\_size (loss is a mean)}
        \end{cases}

    for :math:`k` micro-steps on :math:`W` ranks. Whether a micro-step closes the batch is
    known *before* its forward, so gradients are synchronized on that micro-step only:

    - ``micro_batch_size``: :math:`N = k \cdot` ``micro_batch_size`` :math:`\cdot W`
      needs no communication at all.
    - ``num_items``: ``accumulate(num_items=n)`` all-gathers one packed int64 row
      (micro-step index and ``n``) per rank before the forward, so every rank adds the
      same :math:`N`; the same collective stops ranks whose loops diverged.

    Args:
        model: a plain module, ``DistributedDataParallel``, or a ``fully_shard`` (FSDP2)
            module; FSDP1 works through ``no_sync()``.
        optimizer: the optimizer whose param groups hold ``key``.
        key: the scheduled param-group key holding the target, in items.
        micro_batch_size: items per rank per micro-step when ``num_items`` is not passed.
        process_group: the data-parallel group; defaults to DDP's/FSDP1's own group,
            else the default group. Must be ``None`` for a plain module.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt.param_groups[0]["logical_batch_size"] = 12
        >>> ctl = LogicalBatchSize(model, opt, micro_batch_size=4)
        >>> for step in range(6):
        ...     with ctl.accumulate():
        ...         model(torch.ones(4, 2)).mean().backward()
        ...     print(step, ctl.ready, ctl.metrics()["items"])
        ...     if ctl.ready:
        ...         opt.step(); opt.zero_grad()
        0 False 4.0
        1 False 8.0
        2 True 12.0
        3 False 4.0
        4 False 8.0
        5 True 12.0
    """

    _TAG = 1

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        key: str = "logical_batch_size",
        micro_batch_size: int | None = None,
        process_group: Any | None = None,
    ) -> None:
        check_optional_count(micro_batch_size, "micro_batch_size", "LogicalBatchSize")
        super().__init__(model, optimizer, key, process_group)
        self.micro_batch_size = micro_batch_size
        self._target = math.nan
        self._closing = False
        self._items_after = 0

    def metrics(self) -> dict[str, float]:
        """``target``, ``micro_steps``, ``items`` (global), ``optimizer_steps``,
        ``dropped_batches``."""
        return {"target": self._target, **super().metrics()}

    def _check_mode(self, mode: Mode) -> None:
        if mode == "micro_batch" and self.micro_batch_size is None:
            raise ValueError(
                "LogicalBatchSize.accumulate(num_items=None) needs micro_batch_size: pass "
                "num_items (this rank's sample or token count, with a summed loss) or build "
                "the controller with micro_batch_size=... (with a mean loss)"
            )

    def _begin_logical_batch(self) -> None:
        target = read_scheduled_value(self.optimizer, self.key, "LogicalBatchSize")
        if math.isinf(target):
            raise ValueError(f"LogicalBatchSize: the scheduled {self.key!r} is {target}")
        self._target = target

    def _before_micro_step(self, items: int | None) -> bool:
        if items is None:
            assert self.micro_batch_size is not None  # _check_mode guarantees it
            self._items_after = (self._micro_steps + 1) * self.micro_batch_size * self.world_size
        elif self._distributed:
            total, targets = self._exchange(items, torch.tensor([self._target]))
            if not bool((targets == targets[0]).all()):
                raise RuntimeError(
                    f"LogicalBatchSize: ranks diverged: they read different targets "
                    f"{targets[:, 0].tolist()} from {self.key!r}; step the schedule on every rank"
                )
            self._items_after = self._items + total
        else:
            self._items_after = self._items + items
        # An all-empty logical batch has no mean; keep accumulating until it has items.
        self._closing = self._items_after >= self._target and self._items_after > 0
        return self._closing

    def _after_micro_step(self, items: int | None) -> None:
        self._micro_steps += 1
        self._items = self._items_after
        if self._closing:
            self._close(self._mean_divisor, None)
