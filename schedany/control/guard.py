"""Gradient guards: clip each param group to a scheduled norm, skip a step whose gradient
norm spikes (see ``docs/control_loops.md``, "Gradient guards")."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ._checks import check_state_keys, read_group_values
from ._comm import DataParallelGroup
from ._grad_sync import ModelKind, model_kind, plain_grads_sharded
from ._grads import grads_of, is_dtensor, param_squared_norms, scale_

__all__ = ["GradientGuard"]

_EPS = 1e-6
"""``torch.nn.utils.clip_grad_norm_``'s: the coefficient is ``max_norm / (norm + 1e-6)``."""
_STATE_KEYS = frozenset({"skipped_steps"})


class GradientGuard:
    r"""Clip each param group's gradient to a scheduled norm; skip steps whose norm spikes.

    Call :meth:`apply` once the gradients are final (after ``backward()``, or when a
    controller is ``ready``) and before ``optimizer.step()``. With :math:`\|g_j\|` the
    2-norm of group :math:`j`'s gradients and :math:`\|g\| = (\sum_j \|g_j\|^2)^{1/2}`
    the total, both global (over ranks and FSDP2 shards) and taken before clipping:

    .. math::
        \text{skip} \iff \|g\| > \max_j s_j \ (\text{or } \|g\| \text{ is not finite}),
        \qquad
        g_j \leftarrow \min\Bigl(1, \frac{c_j}{\|g_j\| + 10^{-6}}\Bigr)\, g_j

    where :math:`s_j` is ``group[skip_key]`` and :math:`c_j` is ``group[clip_key]`` (only
    groups that hold the key; the others are left alone). The clipping is
    ``torch.nn.utils.clip_grad_norm_(group["params"], c_j)`` applied group by group. A
    skipped step zeroes the gradients (``optimizer.zero_grad()``) and :meth:`apply`
    returns False: the caller does not call ``optimizer.step()``.

    Every rank takes the same decision: DDP's synchronized gradients give every rank the
    same norms without communication; sharded gradients (FSDP2's DTensors, FSDP1's flat
    shards) need one all-gather of each group's share per :meth:`apply`, which every rank
    sums in the same order.

    Args:
        optimizer: the optimizer whose param groups hold the keys (usually scheduled).
        clip_key: the param-group key holding each group's clipping norm (``None``: no
            clipping).
        skip_key: the param-group key holding the skip threshold, the max over groups
            (``None``: never skip).
        model: the model the optimizer was built on (plain, DDP, ``fully_shard`` or
            FSDP1); it tells where the gradients live and is checked against the
            optimizer. Without it, DTensor gradients are shards over ``process_group``
            and every other gradient is taken as the same on every rank (as DDP leaves it).
        process_group: the group gradients are sharded over; defaults to DDP's/FSDP1's
            own, else the default group.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt.param_groups[0]["gradient_clip_threshold"] = 1.0
        >>> guard = GradientGuard(opt, clip_key="gradient_clip_threshold", model=model)
        >>> model(torch.tensor([[3.0, 4.0]])).sum().backward()
        >>> guard.apply(), guard.metrics()["grad_norm"], round(model.weight.grad.norm().item(), 6)
        (True, 5.0, 1.0)
    """

    name = "GradientGuard"

    def __init__(
        self,
        optimizer: Optimizer,
        clip_key: str | None = None,
        skip_key: str | None = None,
        *,
        model: nn.Module | None = None,
        process_group: Any | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{self.name}: optimizer must be a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        for argument, key in (("clip_key", clip_key), ("skip_key", skip_key)):
            if key is not None and (not isinstance(key, str) or not key):
                raise TypeError(
                    f"{self.name}: {argument} must be a non-empty str or None, got {key!r}"
                )
        kind = self._check_model(model, optimizer)
        self.optimizer = optimizer
        self.clip_key = clip_key
        self.skip_key = skip_key
        self._plain_grads_sharded = model is not None and plain_grads_sharded(model, kind)
        self._dp = DataParallelGroup(model, kind, process_group, self.name)
        # Shards need the one gather per apply(); the same structure on every rank, so
        # every rank agrees on whether to gather.
        self._sharded = self._plain_grads_sharded or any(
            is_dtensor(p) for group in optimizer.param_groups for p in group["params"]
        )
        self._thresholds()  # a mistyped key or a bad value fails here, not mid-run
        self._grad_norm = math.nan
        self._clip_coef = 1.0
        self._skipped = 0

    # --- the public protocol ------------------------------------------------------

    def apply(self) -> bool:
        """Skip or clip the current gradients; False when the step must be skipped.

        The thresholds are read (and checked) first, so a bad scheduled value raises
        before any gradient changes.
        """
        clip, skip = self._thresholds()
        groups = self.optimizer.param_groups
        squares = self._group_squares()
        norm = math.sqrt(math.fsum(squares))
        self._grad_norm, self._clip_coef = norm, 1.0
        if self.skip_key is not None and not norm <= skip:  # nan and inf are skipped too
            self.optimizer.zero_grad(set_to_none=True)
            self._skipped += 1
            return False
        if clip is not None:
            applied = []
            for group, limit, square in zip(groups, clip, squares, strict=True):
                if limit is None:
                    continue
                coef = limit / (math.sqrt(square) + _EPS)
                if not coef >= 1.0:  # a nan coefficient multiplies too, as torch's does
                    scale_(grads_of(group["params"]), coef)
                    applied.append(coef)
            if applied:
                self._clip_coef = min(applied) if not any(map(math.isnan, applied)) else math.nan
        return True

    def metrics(self) -> dict[str, float]:
        """Of the last :meth:`apply`: ``grad_norm`` (total, before clipping) and
        ``clip_coef`` (the smallest factor a group was scaled by; 1.0 when none was),
        and ``skipped_steps`` (total)."""
        return {
            "grad_norm": self._grad_norm,
            "clip_coef": self._clip_coef,
            "skipped_steps": float(self._skipped),
        }

    def state_dict(self) -> dict[str, Any]:
        """The skip counter (the thresholds live in the optimizer and its schedule)."""
        return {"skipped_steps": self._skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; strict about keys."""
        check_state_keys(state_dict, _STATE_KEYS, f"{self.name}.load_state_dict")
        self._skipped = int(state_dict["skipped_steps"])

    # --- machinery ----------------------------------------------------------------

    def _check_model(self, model: nn.Module | None, optimizer: Optimizer) -> ModelKind:
        """How ``model`` holds its gradients, after checking it is the optimizer's."""
        distributed = dist.is_available() and dist.is_initialized()
        if model is None:
            # Without a model the gradients say where they live (DTensor or not); the
            # group is only needed, and only resolved, when they are shards.
            return "fsdp2" if distributed else "plain"
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self.name}: model must be a torch.nn.Module (plain, DDP or fully_shard) or "
                f"None, got {type(model).__name__}"
            )
        known = {id(p) for p in model.parameters()}
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) not in known:
                    raise ValueError(
                        f"{self.name}: optimizer.param_groups[{i}]['params'][{j}] (shape "
                        f"{tuple(p.shape)}) is not a parameter of model "
                        f"({type(model).__name__}); pass the model the optimizer was built "
                        "on, after its DDP or fully_shard wrapping"
                    )
        kind = model_kind(model)
        if kind == "plain" and distributed and dist.get_world_size() > 1:
            raise ValueError(
                f"{self.name}: model is a plain {type(model).__name__} while "
                f"{dist.get_world_size()} ranks run: nothing averages its gradients, so each "
                "rank would clip and skip on its own norm; wrap it in DistributedDataParallel "
                "or fully_shard (FSDP)"
            )
        return kind

    def _thresholds(self) -> tuple[list[float | None] | None, float]:
        """Each group's clipping norm (None: not clipped) and the skip threshold."""
        clip = skip = None
        if self.clip_key is not None:
            clip = read_group_values(self.optimizer, self.clip_key, self.name, minimum=0.0)
        if self.skip_key is not None:
            values = read_group_values(self.optimizer, self.skip_key, self.name, minimum=0.0)
            skip = max(v for v in values if v is not None)
        return clip, math.inf if skip is None else skip

    def _group_squares(self) -> list[float]:
        """``‖g_j‖²`` of every param group, global, the same bits on every rank."""
        shares = [
            param_squared_norms(group["params"], self._plain_grads_sharded)
            for group in self.optimizer.param_groups
        ]
        flat = [t for pair in shares for t in pair]  # sharded_0, replicated_0, sharded_1, ...
        local = torch.stack([t.to(flat[0].device) for t in flat])
        if self._sharded and self._dp.size > 1:
            table = self._dp.all_gather(local, f"the norm of {self.name}.apply()").tolist()
            # Shards add up over ranks; a replicated part is the same on every rank.
            return [
                math.fsum(row[2 * j] for row in table) + table[0][2 * j + 1]
                for j in range(len(shares))
            ]
        values = local.tolist()  # one host sync
        return [values[2 * j] + values[2 * j + 1] for j in range(len(shares))]
