"""Gradient norm threshold scheduling, GNTS (see ``docs/control_loops.md``)."""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from ..errors import ArgumentValueError, check_integer
from ._checks import check_optional_count
from ._comm import Header
from ._protocol import AccumulationController, Decision
from ._sketch import SketchedNorm, check_sketchable
from ._tally import Tally

Norm = Literal["exact", "sketch"]

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

    With ``norm="sketch"`` under DDP on several ranks, gradients stay local between
    micro-steps: each rank adds a CountSketch of its accumulated gradient into a
    ``sketch_size`` vector, one all-reduce of it per micro-step gives every rank the same
    unbiased estimate of :math:`\|S_k\|^2` (relative standard deviation at most
    :math:`\sqrt{2/m}`), and DDP all-reduces the gradients once, when the batch closes,
    so ``.grad`` is then exactly what ``"exact"`` leaves. One process has nothing to
    sketch and decides exactly; FSDP is refused (see ``docs/control_loops.md``).

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
        norm: ``"exact"`` (sync every micro-step) or ``"sketch"`` (one gradient
            all-reduce per optimizer step; DDP or a plain module only).
        sketch_size: ``m``, the sketch's length (``"sketch"`` only); the estimate's
            relative error is about ``sqrt(2/m)``.
        sketch_seed: seeds the sketch's hashes (fresh for every micro-step, the same on
            every rank); saved in :meth:`state_dict`.

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
        norm: Norm = "exact",
        sketch_size: int = 65536,
        sketch_seed: int = 0,
        *,
        noise_scale: bool = False,
        noise_scale_ema: float = 0.95,
    ) -> None:
        check_optional_count(max_accumulation_steps, "max_accumulation_steps", self.name)
        if norm not in ("exact", "sketch"):
            raise ArgumentValueError(self.name, "norm", norm, "'exact' or 'sketch'")
        if norm == "sketch" and noise_scale:
            # The noise scale reads each rank's own gradient at the one sync of a step;
            # with the sketch that path is untested, so it is refused rather than guessed.
            raise ArgumentValueError(
                self.name, "noise_scale", noise_scale, "False with norm='sketch'"
            )
        check_integer(sketch_size, "sketch_size", min=1, func=self.name)
        check_integer(sketch_seed, "sketch_seed", min=0, func=self.name)
        super().__init__(
            model,
            optimizer,
            key,
            process_group,
            noise_scale=noise_scale,
            noise_scale_ema=noise_scale_ema,
        )
        if norm == "sketch" and self._distributed:  # one rank decides exactly, as "exact"
            check_sketchable(model, self._sync.kind, self.name)
        self.max_accumulation_steps = max_accumulation_steps
        self.norm: Norm = norm
        self.sketch_size = int(sketch_size)
        self._grad_norm = math.nan
        # One process already holds the global gradient: nothing to sketch, exact is free.
        self._sketch: SketchedNorm | None = None
        if norm == "sketch" and self._sync.kind == "ddp" and self._distributed:
            self._sketch = SketchedNorm(model, self.sketch_size)
            self._deferred_sync = True
        self._sketch_seed = int(sketch_seed)

    def metrics(self) -> dict[str, float]:
        """``grad_norm`` (of the mean gradient), ``threshold``, ``micro_steps``,
        ``items`` (global; micro-steps without num_items), ``optimizer_steps``,
        ``dropped_batches``."""
        return {"grad_norm": self._grad_norm, "threshold": self._target, **super().metrics()}

    def state_dict(self) -> dict[str, Any]:
        """The counters (see the base class); with ``norm="sketch"`` also ``sketch_seed``."""
        state = super().state_dict()
        if self.norm == "sketch":
            state["sketch_seed"] = self._sketch_seed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; strict about keys (``sketch_seed`` with
        ``norm="sketch"``, none without)."""
        state = dict(state_dict)
        seed = None
        if self.norm == "sketch":
            if "sketch_seed" not in state:
                raise KeyError(
                    f"{self.name}.load_state_dict: missing keys ['sketch_seed'], which "
                    "norm='sketch' saves (a state saved with norm='exact' loads into a "
                    "controller built with norm='exact')"
                )
            seed = check_integer(state.pop("sketch_seed"), "sketch_seed", min=0, func=self.name)
        super().load_state_dict(state)
        if seed is not None:
            self._sketch_seed = seed

    def _exchange(self, header: Header, items: int) -> tuple[int, float]:
        if self._sketch is None:
            return super()._exchange(header, items)
        return self._sketch.exchange(
            self._dp, header, items, self._where, self.key, self._sketch_seed
        )

    def _decide(self, tally: Tally) -> Decision:
        self._grad_norm = tally.grad_norm  # inf or nan if not finite: the base drops it
        limit = self.max_accumulation_steps
        at_limit = limit is not None and tally.micro_steps >= limit
        if tally.items == 0:  # num_items all zero so far: no mean to judge
            return "drop" if at_limit else "continue"
        if tally.grad_norm <= tally.target or at_limit:
            return "close"
        return "continue"
