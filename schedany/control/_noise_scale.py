"""The simple gradient noise scale a controller measures with ``noise_scale=True``.

McCandlish et al. (2018), appendix A.1: for a batch of ``b`` independent items whose
gradients have mean ``G`` and covariance ``Σ``, ``E‖G_b‖² = ‖G‖² + tr(Σ)/b``, so the
squared norms of a "small" and a "big" batch gradient give unbiased estimates of both
``‖G‖²`` and ``tr(Σ)``; ``B_simple = tr(Σ)/‖G‖²`` is their ratio after each is smoothed
by an exponential moving average. See ``docs/control_loops.md``, "The gradient noise
scale", for the two ways the batches are found and what each costs.

The estimator works on *sums*: with ``Q = ‖Σ_items ∇ℓ_i‖²`` the squared norm of a
batch's summed gradient over ``n`` items, ``E Q = n²‖G‖² + n·tr(Σ)``. Several small
batches (one per rank) pool into ``Q_s = Σ_r Q_r`` with ``P = Σ_r n_r²`` and
``M = Σ_r n_r``; with the big batch's ``Q_b`` over ``N`` items::

    ‖G‖² = (M·Q_b − N·Q_s) / (M·N² − N·P)        tr(Σ) = (Q_b − N²·‖G‖²) / N

which for one small batch of ``n`` items (``M = n``, ``P = n²``) is the paper's
``(N‖G_N‖² − n‖G_n‖²)/(N − n)`` and ``(‖G_n‖² − ‖G_N‖²)/(1/n − 1/N)``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import check_real
from ._checks import check_state_keys
from ._comm import DataParallelGroup
from ._grad_sync import ModelKind
from ._grads import squared_norms
from ._tally import Tally

_STATE_KEYS = frozenset({"squared_norm", "trace", "updates"})


class _Listener:
    """The comm hook's state: DDP's group and its all-reduce, and the estimator the hook
    reports to now."""

    def __init__(self, group: Any, allreduce: Any) -> None:
        self.group = group
        self.allreduce = allreduce
        self.noise: NoiseScale | None = None


_HOOKED: weakref.WeakKeyDictionary[nn.Module, _Listener] = weakref.WeakKeyDictionary()
"""DDP models that carry schedany's comm hook. A DDP model takes one hook, once: a new
controller on the same model (a rebuilt one, after a Tune restore) takes it over."""


class NoiseScale:
    """The estimator of one controller: its batches, its moving averages, its state.

    Under DDP with two or more ranks the small batches are the ranks' own gradients,
    read by a DDP communication hook just before the all-reduce of the first micro-step
    that synchronizes (the last one for LogicalBatchSize, the first for GNTS); otherwise
    the small batch is the first micro-step's gradient, over all ranks. The big batch
    is always the whole logical batch over all ranks.

    Units: with ``num_items`` an item; without, one rank's micro-batch (its loss is a
    mean), converted to the controller's items at the end by ``unit_items``.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: ModelKind,
        dp: DataParallelGroup,
        ema: Any,
        owner: str,
        measures_gradients: bool,
    ) -> None:
        self.ema = float(check_real(ema, "noise_scale_ema", min=0.0, lt=1.0, func=owner))
        if kind in ("fsdp1", "fsdp2") and not measures_gradients:
            raise ValueError(
                f"{owner}(noise_scale=True) does not support a sharded ({kind.upper()}) model: "
                f"{owner} synchronizes gradients only on a logical batch's last micro-step, "
                "and a sharded model keeps no rank's own gradient past its reduce-scatter, "
                "so no small-batch gradient is left to measure. Use DDP, or "
                "GradientNormThreshold(noise_scale=True), which reads the first micro-step's "
                "global norm from its own all-gather."
            )
        self.owner = owner
        self.model = model
        self.world = dp.size
        self._dp = dp
        self._measured = measures_gradients
        self._by_ranks = kind == "ddp" and dp.size > 1
        if self._by_ranks:
            self._register_hook(model)
        self._squared_norm = self._trace = 0.0  # the moving averages, started at 0 ...
        self._updates = 0  # ... whose common bias (1 - ema**updates) cancels in the ratio
        self._armed = False
        self._buckets: list[Tensor] = []
        self._local_units = 0  # this rank's units of the logical batch so far
        self._small_local = 0  # ... when the hook read its gradient
        self._small: tuple[float, float, float] | None = None  # (Q_s, P, M)

    @property
    def value(self) -> float:
        """``tr(Σ)/‖G‖²`` of the moving averages, in the controller's items (nan before
        the first estimate)."""
        return self._trace / self._squared_norm if self._updates else math.nan

    def begin(self) -> None:
        """A logical batch starts."""
        self._armed = self._by_ranks
        self._buckets = []
        self._local_units = self._small_local = 0
        self._small = None

    def observe(self, tally: Tally, items: int | None, synced: bool, decision: str) -> None:
        """One micro-step has run its backward (``items``: this rank's, or None)."""
        self._local_units += 1 if items is None else items
        if self._by_ranks:
            if self._armed and synced:  # the hook saw this rank's whole gradient so far
                self._armed = False
                self._small_local = self._local_units
            return
        units = self._units(tally, items is not None)
        if self._small is None and decision == "continue" and units > 0:
            q = self.world**2 * self._sum_of_squares(tally)
            self._small = (q, float(units) ** 2, float(units))

    def close(self, tally: Tally, per_item: bool, unit_items: float) -> None:
        """The logical batch is ready (gradients not yet divided): update the estimate.

        Under DDP this is the one collective: the ranks' ``[Q_r, n_r², n_r]`` summed.
        """
        big = self.world**2 * self._sum_of_squares(tally)
        n = float(self._units(tally, per_item))
        if self._by_ranks:
            local = float(torch.stack(self._buckets).sum()) if self._buckets else 0.0
            units = float(self._small_local)
            where = f"the noise scale of {self.owner}'s logical batch"
            self._small = tuple(self._dp.sum([local, units**2, units], where))  # type: ignore[assignment]
        if self._small is None:
            return  # one micro-step: no small batch (the paper's estimator needs two sizes)
        small, p, m = self._small
        denominator = n * (m * n - p)
        if not denominator > 0:  # every item in one small batch
            return
        squared_norm = (m * big - n * small) / denominator
        trace = (big - n * n * squared_norm) / n * unit_items
        if not (math.isfinite(squared_norm) and math.isfinite(trace)):
            return
        beta = self.ema
        self._squared_norm = beta * self._squared_norm + (1 - beta) * squared_norm
        self._trace = beta * self._trace + (1 - beta) * trace
        self._updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"squared_norm": self._squared_norm, "trace": self._trace, "updates": self._updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_keys(state_dict, _STATE_KEYS, f"{self.owner}.load_state_dict: noise_scale")
        self._squared_norm = float(state_dict["squared_norm"])
        self._trace = float(state_dict["trace"])
        self._updates = int(state_dict["updates"])

    # --- machinery ----------------------------------------------------------------

    def _units(self, tally: Tally, per_item: bool) -> int:
        """Units of the logical batch so far, over all ranks."""
        return tally.items if per_item else self.world * tally.micro_steps

    def _sum_of_squares(self, tally: Tally) -> float:
        """``‖.grad‖²``, global: from the controller's own measurement when it takes one
        (or made one for this close), else computed here (replicated or local gradients
        only: see ``__init__``)."""
        if self._measured or not math.isnan(tally.sum_of_squares):
            return tally.sum_of_squares
        sharded, replicated = squared_norms(self.model, False)
        return float(sharded + replicated)

    def _register_hook(self, model: nn.Module) -> None:
        listener = _HOOKED.get(model)
        if listener is not None:
            listener.noise = self
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        listener = _Listener(model.process_group, default_hooks.allreduce_hook)
        try:
            model.register_comm_hook(listener, _hook)  # type: ignore[operator]
        except RuntimeError as exc:
            raise ValueError(
                f"{self.owner}(noise_scale=True) reads each rank's own gradient in a DDP "
                "communication hook, just before DDP's all-reduce, but the model has a comm "
                f"hook already ({exc}); build the controller without noise_scale, or the "
                "model without its hook"
            ) from exc
        listener.noise = self
        _HOOKED[model] = listener

    def read_bucket(self, buffer: Tensor) -> None:
        """The comm hook's report: one bucket of this rank's own (not yet averaged)
        gradient, kept while the logical batch's small batch is being read."""
        if self._armed:
            self._buckets.append(torch.linalg.vector_norm(buffer).to(torch.float64).square())


# No annotations: DDP checks a hook's against the real classes, and this module's are
# postponed (strings). The hook is allreduce_hook, DDP's default, after a norm.
def _hook(listener, bucket):  # type: ignore[no-untyped-def]
    if listener.noise is not None:
        listener.noise.read_bucket(bucket.buffer())  # before allreduce divides it in place
    return listener.allreduce(listener.group, bucket)
