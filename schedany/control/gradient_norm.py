"""Gradient norm threshold scheduling, GNTS (see ``docs/control_loops.md``)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ._checks import check_optional_count
from ._protocol import AccumulationController, Decision, Tally

__all__ = ["GradientNormThreshold"]


class GradientNormThreshold(AccumulationController):
    r"""Accumulate micro-batches until the mean gradient is short enough, then step.

    After micro-step :math:`k` the accumulated gradient :math:`S_k` (summed over
    micro-steps, averaged over ranks by DDP/FSDP) is turned into the mean gradient
    and compared with the threshold :math:`\tau` (the max over param groups of
    ``key``, read when the logical batch starts):

    .. math::
        \|\bar g_k\|_2 = \begin{cases}
            \|S_k\|_2 \, W / N_k & \text{with num\_items (loss is a sum, } N_k
                \text{ items over all ranks)}\\
            \|S_k\|_2 / k & \text{without (loss is a micro-batch mean)}
        \end{cases}
        \qquad \text{ready} \iff \|\bar g_k\|_2 \le \tau
        \ \text{or}\ k = \texttt{max\_accumulation\_steps}

    When ready, ``.grad`` holds :math:`\bar g_k`. The norm is global, over all ranks
    and shards (each rank's share of :math:`\|S_k\|^2` rides in the one all-gather of
    the micro-step). Gradients are synchronized every micro-step, since any micro-step
    may close the batch. A NaN or inf norm drops the logical batch on every rank.

    Args:
        model: a plain module, ``DistributedDataParallel``, or a ``fully_shard`` (FSDP2)
            module; FSDP1 (FULL_SHARD, SHARD_GRAD_OP, NO_SHARD) works too.
        optimizer: the optimizer whose param groups hold ``key``.
        key: the scheduled param-group key holding the threshold.
        max_accumulation_steps: step anyway after this many micro-steps (``None``: never).
        process_group: the data-parallel group; defaults to DDP's/FSDP1's own group,
            else the default group. Must be ``None`` for a plain module.
        noise_scale: also estimate the gradient noise scale ``tr(Σ)/‖G‖²`` (McCandlish
            et al. 2018) at each ready batch, in items, as ``metrics()["noise_scale"]``
            (docs/control_loops.md, "The gradient noise scale").
        noise_scale_ema: the moving-average factor smoothing its two estimates.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.ones_(model.weight)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt.param_groups[0]["gradient_norm_threshold"] = 0.5
        >>> ctl = GradientNormThreshold(model, opt, max_accumulation_steps=4)
        >>> for x in [1.0, -1.0, 1.0, 0.0]:
        ...     with ctl.accumulate():
        ...         model(torch.tensor([[x]])).sum().backward()
        ...     print(ctl.ready, ctl.metrics()["grad_norm"])
        ...     if ctl.ready:
        ...         opt.step(); opt.zero_grad()
        False 1.0
        True 0.0
        False 1.0
        True 0.5
    """

    name = "GradientNormThreshold"
    measures_gradients = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        key: str = "gradient_norm_threshold",
        max_accumulation_steps: int | None = None,
        process_group: Any | None = None,
        *,
        noise_scale: bool = False,
        noise_scale_ema: float = 0.95,
    ) -> None:
        check_optional_count(max_accumulation_steps, "max_accumulation_steps", self.name)
        super().__init__(
            model,
            optimizer,
            key,
            process_group,
            noise_scale=noise_scale,
            noise_scale_ema=noise_scale_ema,
        )
        self.max_accumulation_steps = max_accumulation_steps
        self._grad_norm = math.nan

    def metrics(self) -> dict[str, float]:
        """``grad_norm`` (of the mean gradient), ``threshold``, ``micro_steps``,
        ``items`` (global; micro-steps without num_items), ``optimizer_steps``,
        ``dropped_batches``."""
        return {"grad_norm": self._grad_norm, "threshold": self._target, **super().metrics()}

    def _decide(self, tally: Tally) -> Decision:
        self._grad_norm = tally.grad_norm  # inf or nan if not finite: the base drops it
        limit = self.max_accumulation_steps
        at_limit = limit is not None and tally.micro_steps >= limit
        if tally.items == 0:  # num_items all zero so far: no mean to judge
            return "drop" if at_limit else "continue"
        if tally.grad_norm <= tally.target or at_limit:
            return "close"
        return "continue"
