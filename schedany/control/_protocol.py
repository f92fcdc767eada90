"""The ``accumulate()`` / ``ready`` protocol both reactive controllers share.

A controller runs one *logical batch* at a time: it opens one on the first micro-step
after the previous one closed (reading the scheduled target then, after the user's
``schedule.step()``), takes one decision per micro-step, and closes it either *ready*
(gradients rescaled to the mean, the user steps) or *dropped* (non-finite gradients:
zeroed, nobody steps). Decisions that need other ranks' numbers come from one packed
all-gather whose header (controller, mode, logical batch, micro-step) every rank
checks, so ranks whose loops drifted apart stop with an error instead of pairing the
wrong collectives.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._targets import did_you_mean
from ._comm import DataParallelGroup
from ._grad_sync import GradientSync
from ._grads import all_finite, divide_, local_grads

__all__ = ["AccumulationController", "check_optional_count", "read_scheduled_value"]

Mode = Literal["micro_batch", "num_items"]
_STATE_KEYS = frozenset({"controller", "mode", "optimizer_steps", "dropped_batches"})
_HEADER = 4  # tag, logical batch, micro-step, items; payload columns follow


def read_scheduled_value(optimizer: Optimizer, key: str, owner: str) -> float:
    """The max over param groups of ``group[key]`` (groups without the key are skipped)."""
    values = []
    for i, group in enumerate(optimizer.param_groups):
        if key not in group:
            continue
        value = group[key]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{owner}: optimizer.param_groups[{i}][{key!r}] must be a real number, got {value!r}"
            )
        values.append(float(value))
    if not values:
        keys = sorted({k for group in optimizer.param_groups for k in group if k != "params"})
        raise KeyError(
            f"{owner}: key={key!r} is in no optimizer param group (keys: {keys})"
            f"{did_you_mean(key, keys)} "
            f"Add it first: schedany.extend_optimizer(optimizer, {key!r}, initial_value)"
        )
    value = max(values)
    if math.isnan(value):
        raise ValueError(f"{owner}: the scheduled {key!r} is nan (max over param groups)")
    return value


def check_optional_count(value: Any, name: str, owner: str) -> None:
    """Reject ``value`` unless it is ``None`` or an ``int >= 1`` (a bool is no int here)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")


class AccumulationController:
    """Base of :class:`LogicalBatchSize` and :class:`GradientNormThreshold`.

    Subclasses set ``_TAG`` and implement ``_begin_logical_batch`` (read the target),
    ``_before_micro_step`` (return whether this micro-step must sync gradients) and
    ``_after_micro_step`` (decide, then ``_close`` when the logical batch ends).
    """

    _TAG: ClassVar[int]

    def __init__(
        self, model: nn.Module, optimizer: Optimizer, key: str, process_group: Any | None
    ) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{owner}: model must be a torch.nn.Module (plain, DDP or fully_shard), "
                f"got {type(model).__name__}"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(key, str) or not key:
            raise TypeError(f"{owner}: key must be a non-empty str, got {key!r}")
        self.model = model
        self.optimizer = optimizer
        self.key = key
        self._sync = GradientSync(model)
        self._dp = DataParallelGroup(model, self._sync.kind, process_group, owner)
        self.world_size = self._dp.size
        # FSDP1 keeps each rank's shard of the flat gradient in a plain tensor.
        self._plain_grads_sharded = self._sync.kind == "fsdp1" and (
            str(getattr(model, "sharding_strategy", "")).split(".")[-1] != "NO_SHARD"
        )
        read_scheduled_value(optimizer, key, owner)  # a typo fails here, not mid-run
        self._mode: Mode | None = None
        self._optimizer_steps = 0
        self._dropped_batches = 0
        self._micro_steps = 0
        self._items = 0
        self._open = False
        self._ready = False
        self._in_block = False
        self._failed = False

    # --- the public protocol ------------------------------------------------------

    @contextlib.contextmanager
    def accumulate(self, num_items: int | None = None) -> Iterator[None]:
        """Run the forward *and* backward of one micro-batch inside this block.

        Args:
            num_items: samples (or tokens) in this rank's micro-batch. With it the loss
                must be a *sum* over those items; without it, a micro-batch mean. Pass
                it on every micro-step or on none.
        """
        owner = type(self).__name__
        if self._in_block:
            raise RuntimeError(f"{owner}.accumulate() blocks cannot be nested")
        if self._failed:
            raise RuntimeError(
                f"{owner}: an earlier accumulate() block raised, so its logical batch can't "
                "be finished the same way on every rank; load a checkpoint "
                "(load_state_dict) or build a new controller"
            )
        items = self._check_num_items(num_items)
        if not self._open:
            self._begin_logical_batch()  # may reject the target; nothing has changed yet
            self._micro_steps, self._items, self._ready, self._open = 0, 0, False, True
        # Until this micro-step completes, an exception anywhere (a failed collective,
        # the user's forward) leaves a logical batch no rank can finish consistently.
        self._failed = True
        sync = self._before_micro_step(items)
        self._in_block = True
        try:
            with self._sync(sync):
                yield
        except RuntimeError as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(
                    f"schedany: raised inside {owner}.accumulate() at {self._where}. If it "
                    "is a timeout or a closed connection, the ranks diverged: another rank "
                    "stopped calling accumulate() (or crashed) and left this collective "
                    "without a partner."
                )
            raise
        finally:
            self._in_block = False
        self._after_micro_step(items)
        self._failed = False

    @property
    def ready(self) -> bool:
        """True right after the micro-step that closed a logical batch with finite
        gradients, until the next ``accumulate()``; the same on every rank."""
        return self._ready

    def metrics(self) -> dict[str, float]:
        """Counters of the current (or just closed) logical batch, and totals."""
        return {
            "micro_steps": float(self._micro_steps),
            "items": float(self._items),
            "optimizer_steps": float(self._optimizer_steps),
            "dropped_batches": float(self._dropped_batches),
        }

    def state_dict(self) -> dict[str, Any]:
        """The counters, at an optimizer-step boundary (not inside a logical batch)."""
        if self._open:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() called in the middle of a logical "
                f"batch (after micro-step {self._micro_steps}); its accumulated gradients "
                "belong to no checkpoint. Save when ready is True (after optimizer.step())."
            )
        return {
            "controller": type(self).__name__,
            "mode": self._mode,
            "optimizer_steps": self._optimizer_steps,
            "dropped_batches": self._dropped_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict`; strict about keys and class."""
        owner = type(self).__name__
        missing, unknown = _STATE_KEYS - state_dict.keys(), state_dict.keys() - _STATE_KEYS
        if missing or unknown:
            raise KeyError(
                f"{owner}.load_state_dict: missing keys {sorted(missing)}, "
                f"unknown keys {sorted(unknown)}"
            )
        if state_dict["controller"] != owner:
            raise ValueError(
                f"{owner}.load_state_dict: the state was saved by {state_dict['controller']!r}"
            )
        if self._in_block:
            raise RuntimeError(f"{owner}.load_state_dict() called inside accumulate()")
        self._mode = state_dict["mode"]
        self._optimizer_steps = int(state_dict["optimizer_steps"])
        self._dropped_batches = int(state_dict["dropped_batches"])
        self._micro_steps, self._items = 0, 0
        self._open = self._ready = self._failed = False

    # --- hooks for the subclasses -------------------------------------------------

    def _begin_logical_batch(self) -> None:
        raise NotImplementedError

    def _before_micro_step(self, items: int | None) -> bool:
        raise NotImplementedError

    def _after_micro_step(self, items: int | None) -> None:
        raise NotImplementedError

    # --- shared machinery ---------------------------------------------------------

    @property
    def _batch_index(self) -> int:
        return self._optimizer_steps + self._dropped_batches

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1

    @property
    def _mean_divisor(self) -> float:
        """What turns the accumulated ``.grad`` into the mean: ``N / W`` with num_items
        (DDP/FSDP already averaged over the ``W`` ranks), else the micro-step count."""
        if self._mode == "num_items":
            return self._items / self.world_size
        return float(self._micro_steps)

    @property
    def _where(self) -> str:
        return f"logical batch {self._batch_index}, micro-step {self._micro_steps}"

    def _check_num_items(self, num_items: Any) -> int | None:
        owner = type(self).__name__
        if isinstance(num_items, Tensor) and num_items.numel() == 1 and not num_items.is_floating_point():
            num_items = int(num_items.item())
        if num_items is not None and (
            isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral)
        ):
            raise TypeError(
                f"{owner}.accumulate: num_items must be an int (this rank's sample or token "
                f"count) or None, got {num_items!r}"
            )
        if num_items is not None and num_items < 0:
            raise ValueError(f"{owner}.accumulate: num_items must be >= 0, got {num_items}")
        mode: Mode = "micro_batch" if num_items is None else "num_items"
        if self._mode is None:
            self._check_mode(mode)
            self._mode = mode
        elif mode != self._mode:
            raise ValueError(
                f"{owner}.accumulate(num_items={num_items!r}): this controller has run "
                f"{'with' if self._mode == 'num_items' else 'without'} num_items so far; pass "
                "it on every micro-step or on none (with it the loss is a sum, without it a mean)"
            )
        return None if num_items is None else int(num_items)

    def _check_mode(self, mode: Mode) -> None:
        """Subclasses reject a mode they cannot count in."""

    def _exchange(self, items: int, payload: Tensor | None = None) -> tuple[int, Tensor]:
        """The one per-micro-step collective: all-gather ``[header, payload]``.

        Returns the items summed over ranks and the float64 payload of every rank
        (shape ``(world_size, n)``). Raises if the headers disagree.
        """
        tag = 2 * self._TAG + (self._mode == "num_items")
        header = [tag, self._batch_index, self._micro_steps, items]
        local = torch.tensor(header, dtype=torch.int64)
        if payload is not None:  # floats travel as their int64 bit patterns
            bits = payload.to(torch.float64).reshape(-1).view(torch.int64)
            local = torch.cat([local.to(bits.device), bits])
        rows = self._dp.all_gather(local, self._where)
        ids = rows[:, :3]
        if not bool((ids == ids[0]).all()):
            where = ", ".join(
                f"rank {r}: {'LogicalBatchSize' if t // 2 == 1 else 'GradientNormThreshold'}"
                f"{' with num_items' if t % 2 else ''}, logical batch {b}, micro-step {m}"
                for r, (t, b, m) in enumerate(ids.tolist())
            )
            raise RuntimeError(
                f"{type(self).__name__}: ranks diverged: their accumulate() calls no longer "
                f"line up ({where}). Every rank must run the same micro-steps, pass num_items "
                "on all of them or none, and resume from the same checkpoint."
            )
        return int(rows[:, 3].sum()), rows[:, _HEADER:].contiguous().view(torch.float64)

    def _agree_finite(self, grads: list[Tensor]) -> bool:
        """Whether the synced gradients are finite, the same answer on every rank.

        DDP leaves bitwise-identical gradients on every rank, so a local check agrees
        by construction; sharded gradients (FSDP) need one 1-element all-reduce.
        """
        finite = all_finite(grads)
        if not (self._distributed and self._sync.kind in ("fsdp1", "fsdp2")):
            return finite
        return not self._dp.any(not finite, f"the non-finite check of {self._where}")

    def _close(self, divisor: float, finite: bool | None) -> None:
        """End the logical batch: mean gradients and ready, or drop it on every rank."""
        grads = local_grads(self.model)
        if finite is None:
            finite = self._agree_finite(grads)
        self._open = False
        if finite:
            divide_(grads, divisor)
            self._ready = True
            self._optimizer_steps += 1
        else:
            self.model.zero_grad(set_to_none=True)
            self._micro_steps, self._items = 0, 0
            self._dropped_batches += 1
