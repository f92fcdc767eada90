"""Gradient accumulation to a scheduled logical batch size (see ``docs/control_loops.md``)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ._checks import check_optional_count
from ._protocol import AccumulationController, Decision
from ._tally import Tally

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
        noise_scale: also estimate the gradient noise scale ``tr(Σ)/‖G‖²`` (McCandlish
            et al. 2018) at each ready batch, in items, as ``metrics()["noise_scale"]``
            (docs/control_loops.md, "The gradient noise scale").
        noise_scale_ema: the moving-average factor smoothing its two estimates.

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

    name = "LogicalBatchSize"

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        key: str = "logical_batch_size",
        micro_batch_size: int | None = None,
        process_group: Any | None = None,
        *,
        noise_scale: bool = False,
        noise_scale_ema: float = 0.95,
    ) -> None:
        check_optional_count(micro_batch_size, "micro_batch_size", self.name)
        super().__init__(
            model,
            optimizer,
            key,
            process_group,
            noise_scale=noise_scale,
            noise_scale_ema=noise_scale_ema,
        )
        self.micro_batch_size = micro_batch_size

    def metrics(self) -> dict[str, float]:
        """``target``, ``micro_steps``, ``items`` (global), ``optimizer_steps``,
        ``dropped_batches``."""
        return {"target": self._target, **super().metrics()}

    def _decide(self, tally: Tally) -> Decision:
        # An all-empty logical batch has no mean; keep accumulating until it has items.
        if tally.items >= tally.target and tally.items > 0:
            return "close"
        return "continue"

    def _read_target(self) -> float:
        target = super()._read_target()
        if math.isinf(target):  # no logical batch would ever close
            raise ValueError(f"{self.name}: the scheduled {self.key!r} is {target}")
        return target

    def _micro_batch_items(self) -> int:
        if self.micro_batch_size is None:
            raise ValueError(
                f"{self.name}.accumulate(num_items=None) needs micro_batch_size: pass "
                "num_items (this rank's sample or token count, with a summed loss) or build "
                "the controller with micro_batch_size=... (with a mean loss)"
            )
        return self.micro_batch_size * self.world_size
