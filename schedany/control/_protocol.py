"""The ``accumulate()`` / ``ready`` protocol both reactive controllers share.

See ``docs/control_loops.md``. The base class owns the protocol and the counters: it opens
a *logical batch* on the first micro-step after the previous one closed (reading the
scheduled target then, after the user's ``schedule.step()``), counts its micro-steps and
items over all ranks, and ends it *ready* (gradients rescaled to the mean, the user steps)
or *dropped* (gradients zeroed, nobody steps). A subclass answers one question per
micro-step, from a :class:`Tally` that is the same on every rank: continue, close or drop.

When it is asked follows from what the answer needs. A controller that decides from counts
is asked before the forward, so that only the micro-step that closes synchronizes
gradients; as its decision never saw them, the gradients are checked for NaN/inf when it
closes. A controller that decides from the gradient norm (``measures_gradients``) is asked
after the backward, every micro-step synchronizes, and a non-finite norm drops the logical
batch at once; unless it estimates the norm from the unsynchronized gradients
(``_deferred_sync``, GNTS with ``norm="sketch"``): then no micro-step synchronizes and the
gradients are reduced once, when the batch closes.

Numbers from other ranks come from one packed all-gather whose header (controller, mode,
logical batch, micro-step, target) every rank checks, so ranks whose loops drifted apart
stop with an error instead of pairing the wrong collectives.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_num_items, check_state_keys, read_scheduled_value
from ._comm import DataParallelGroup, Header, register_controller
from ._grad_sync import GradientSync, plain_grads_sharded
from ._grads import all_finite, divide_, local_grads, squared_norms
from ._noise_scale import NoiseScale
from ._tally import Tally

Mode = Literal["micro_batch", "num_items"]
Decision = Literal["continue", "close", "drop"]
"""A controller's answer for one micro-step: keep accumulating, end the logical batch with
the mean gradient (ready), or end it without an optimizer step."""
_STATE_KEYS = frozenset({"controller", "mode", "optimizer_steps", "dropped_batches"})
_NOISE_KEY = "noise_scale"  # in the state only with noise_scale=True


def _sum_over_ranks(rows: Tensor) -> float:
    """The global ``‖S‖²`` from every rank's ``(sharded, replicated)`` row of shares.

    The sharded shares add up over ranks; the replicated one is the same on every rank.
    Every rank sums the same numbers in the same order, so it gets the same bits and
    takes the same decision.
    """
    values = rows.tolist()
    return math.fsum(sharded for sharded, _ in values) + values[0][1]


class AccumulationController:
    """Base of :class:`LogicalBatchSize` and :class:`GradientNormThreshold`.

    A subclass sets ``name`` (in messages, checkpoints and the all-gathered header), sets
    ``measures_gradients`` if its decision needs the gradient norm, and implements
    ``_decide``. It may override ``_read_target`` (to reject a target) and
    ``_micro_batch_items`` (what a micro-step without num_items counts).
    """

    name: ClassVar[str]
    measures_gradients: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register_controller(cls.name)

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        key: str,
        process_group: Any | None,
        *,
        noise_scale: bool = False,
        noise_scale_ema: float = 0.95,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self.name}: model must be a torch.nn.Module (plain, DDP or fully_shard), "
                f"got {type(model).__name__}"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{self.name}: optimizer must be a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        if not isinstance(key, str) or not key:
            raise TypeError(f"{self.name}: key must be a non-empty str, got {key!r}")
        if not isinstance(noise_scale, bool):
            raise TypeError(f"{self.name}: noise_scale must be a bool, got {noise_scale!r}")
        self.model = model
        self.optimizer = optimizer
        self.key = key
        self._sync = GradientSync(model)
        self._dp = DataParallelGroup(model, self._sync.kind, process_group, self.name)
        self.world_size = self._dp.size
        self._plain_grads_sharded = plain_grads_sharded(model, self._sync.kind)
        read_scheduled_value(optimizer, key, self.name)  # a typo fails here, not mid-run
        self._noise = None  # built last: under DDP it registers a comm hook on the model
        if noise_scale:
            self._noise = NoiseScale(
                model,
                self._sync.kind,
                self._dp,
                noise_scale_ema,
                self.name,
                self.measures_gradients,
            )
        self._mode: Mode | None = None
        self._optimizer_steps = 0
        self._dropped_batches = 0
        self._target = math.nan
        self._micro_steps = 0
        self._items = 0
        self._open = False
        self._ready = False
        self._in_block = False
        self._failed = False
        self._deferred_sync = False
        """A gradient-measuring subclass sets it when its ``_exchange`` needs no synced
        gradients: sync then stays off and the gradients are reduced when a batch closes."""

    # --- the public protocol ------------------------------------------------------

    @contextlib.contextmanager
    def accumulate(self, num_items: int | None = None) -> Iterator[None]:
        """Run the forward *and* backward of one micro-batch inside this block.

        Args:
            num_items: samples (or tokens) in this rank's micro-batch. With it the loss
                must be a *sum* over those items; without it, a micro-batch mean. Pass
                it on every micro-step or on none.
        """
        if self._in_block:
            raise RuntimeError(f"{self.name}.accumulate() blocks cannot be nested")
        if self._failed:
            raise RuntimeError(
                f"{self.name}: an earlier accumulate() block raised, so its logical batch "
                "can't be finished the same way on every rank; load a checkpoint "
                "(load_state_dict) or build a new controller"
            )
        items = self._check_num_items(num_items)
        if not self._open:
            self._target = self._read_target()  # may reject it; nothing has changed yet
            self._micro_steps, self._items, self._ready, self._open = 0, 0, False, True
            if self._noise is not None:
                self._noise.begin()
        # Until this micro-step completes, an exception anywhere (a failed collective,
        # the user's forward) leaves a logical batch no rank can finish consistently.
        self._failed = True
        # DDP reads its sync flag in forward(): a decision from counts is taken before it,
        # so only the closing micro-step syncs; one that needs the synced gradients can
        # only come after the backward, so every micro-step syncs (none does when the
        # subclass measures the unsynced ones and reduces them at the close).
        early = None if self.measures_gradients else self._ask(items)
        sync = early[1] == "close" if early else not self._deferred_sync
        self._in_block = True
        try:
            with self._sync(enabled=sync):
                yield
        except RuntimeError as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(
                    f"schedany: raised inside {self.name}.accumulate() at {self._where}. If "
                    "it is a timeout or a closed connection, the ranks diverged: another "
                    "rank stopped calling accumulate() (or crashed) and left this "
                    "collective without a partner."
                )
            raise
        finally:
            self._in_block = False
        tally, decision = early or self._ask(items)
        if self._noise is not None:
            self._noise.observe(tally, items, sync, decision)
        self._end_micro_step(tally, decision)
        self._failed = False

    @property
    def ready(self) -> bool:
        """True right after the micro-step that closed a logical batch with finite
        gradients, until the next ``accumulate()``; the same on every rank."""
        return self._ready

    def metrics(self) -> dict[str, float]:
        """Counters of the current (or just closed) logical batch, and totals; with
        ``noise_scale=True``, ``noise_scale`` (in items, as of the last ready batch)."""
        out = {
            "micro_steps": float(self._micro_steps),
            "items": float(self._items),
            "optimizer_steps": float(self._optimizer_steps),
            "dropped_batches": float(self._dropped_batches),
        }
        if self._noise is not None:
            out[_NOISE_KEY] = self._noise.value
        return out

    def state_dict(self) -> dict[str, Any]:
        """The counters, at an optimizer-step boundary (not inside a logical batch)."""
        if self._open:
            raise RuntimeError(
                f"{self.name}.state_dict() called in the middle of a logical batch (after "
                f"micro-step {self._micro_steps}); its accumulated gradients belong to no "
                "checkpoint. Save when ready is True (after optimizer.step())."
            )
        state: dict[str, Any] = {
            "controller": self.name,
            "mode": self._mode,
            "optimizer_steps": self._optimizer_steps,
            "dropped_batches": self._dropped_batches,
        }
        if self._noise is not None:
            state[_NOISE_KEY] = self._noise.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict`; strict about keys and class."""
        keys = _STATE_KEYS | ({_NOISE_KEY} if self._noise is not None else set())
        check_state_keys(state_dict, keys, f"{self.name}.load_state_dict")
        if state_dict["controller"] != self.name:
            raise ValueError(
                f"{self.name}.load_state_dict: the state was saved by {state_dict['controller']!r}"
            )
        if self._in_block:
            raise RuntimeError(f"{self.name}.load_state_dict() called inside accumulate()")
        self._mode = state_dict["mode"]
        self._optimizer_steps = int(state_dict["optimizer_steps"])
        self._dropped_batches = int(state_dict["dropped_batches"])
        if self._noise is not None:
            self._noise.load_state_dict(state_dict[_NOISE_KEY])
        self._micro_steps, self._items = 0, 0
        self._open = self._ready = self._failed = False

    # --- what a subclass answers --------------------------------------------------

    def _decide(self, tally: Tally) -> Decision:
        """Whether the logical batch goes on, closes or is dropped after this micro-step."""
        raise NotImplementedError

    def _read_target(self) -> float:
        """The target of a new logical batch: the max over param groups of ``key``."""
        return read_scheduled_value(self.optimizer, self.key, self.name)

    def _micro_batch_items(self) -> int:
        """Items a micro-step without num_items adds (over all ranks): one unit here.
        A controller that cannot count without num_items raises ``ValueError``."""
        return 1

    def _unit_items(self) -> float:
        """What the noise scale's unit is in items: an item with num_items, else one
        rank's micro-batch, its share of :meth:`_micro_batch_items`."""
        return 1.0 if self._mode == "num_items" else self._micro_batch_items() / self.world_size

    # --- the protocol's machinery -------------------------------------------------

    @property
    def _batch_index(self) -> int:
        return self._optimizer_steps + self._dropped_batches

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1

    @property
    def _where(self) -> str:
        return f"logical batch {self._batch_index}, micro-step {self._micro_steps}"

    def _check_num_items(self, num_items: Any) -> int | None:
        items = check_num_items(num_items, self.name)
        mode: Mode = "micro_batch" if items is None else "num_items"
        if self._mode is None:
            if mode == "micro_batch":
                self._micro_batch_items()  # raises if this controller can't count that way
            self._mode = mode
        elif mode != self._mode:
            raise ValueError(
                f"{self.name}.accumulate(num_items={items!r}): this controller has run "
                f"{'with' if self._mode == 'num_items' else 'without'} num_items so far; pass "
                "it on every micro-step or on none (with it the loss is a sum, without it a mean)"
            )
        return items

    def _ask(self, items: int | None) -> tuple[Tally, Decision]:
        """This micro-step's tally and the subclass's decision on it."""
        tally = self._tally(items)
        return tally, self._decide(tally)

    def _tally(self, items: int | None) -> Tally:
        """The counts after this micro-step (and the gradient norm, if measured), taking
        one collective when they need other ranks' numbers, none otherwise."""
        summed, sum_of_squares = items or 0, math.nan
        if self._distributed and (items is not None or self.measures_gradients):
            header = Header(
                controller=self.name,
                num_items=self._mode == "num_items",
                logical_batch=self._batch_index,
                micro_step=self._micro_steps,
                target=self._target,
            )
            summed, sum_of_squares = self._exchange(header, items or 0)
        elif self.measures_gradients:
            sum_of_squares = self._local_sum_of_squares()
        micro_steps = self._micro_steps + 1
        if self._mode == "num_items":
            total = self._items + summed
            divisor = total / self.world_size
        else:
            total = self._items + self._micro_batch_items()
            divisor = float(micro_steps)
        return Tally(micro_steps, total, self._target, divisor, sum_of_squares)

    def _local_sum_of_squares(self) -> float:
        """``‖.grad‖²`` from this rank's gradients alone (one pass, one host sync)."""
        shares = squared_norms(self.model, self._plain_grads_sharded)
        return float(shares[0] + shares[1])

    def _exchange(self, header: Header, items: int) -> tuple[int, float]:
        """Items summed over ranks and the global ``‖S‖²`` (nan unless measured), in one
        all-gather of every rank's row."""
        shares = None  # the (sharded, replicated) parts of this rank's ‖S‖²
        if self.measures_gradients:
            shares = squared_norms(self.model, self._plain_grads_sharded)
        payload = None if shares is None else torch.stack(shares)
        summed, rows = self._dp.exchange(header, items, payload, self._where, self.key)
        return summed, math.nan if shares is None else _sum_over_ranks(rows)

    def _agree_finite(self, grads: list[Tensor]) -> bool:
        """Whether the synced gradients are finite, the same answer on every rank.

        DDP leaves bitwise-identical gradients on every rank, so a local check agrees
        by construction; sharded gradients (FSDP) need one 1-element all-reduce.
        """
        finite = all_finite(grads)
        if not (self._distributed and self._sync.kind in ("fsdp1", "fsdp2")):
            return finite
        return not self._dp.any(not finite, f"the non-finite check of {self._where}")

    def _end_micro_step(self, tally: Tally, decision: Decision) -> None:
        """Count the micro-step, then close or drop the logical batch if it ends here."""
        self._micro_steps, self._items = tally.micro_steps, tally.items
        if self.measures_gradients and not math.isfinite(tally.sum_of_squares):
            decision = "drop"  # every rank gathered the same non-finite sum
        if decision == "continue":
            return
        self._open = False
        if decision == "close":
            if self._deferred_sync:
                self._sync.reduce_accumulated()  # the batch's one gradient all-reduce
            grads = local_grads(self.model)
            if self._noise is not None and not self.measures_gradients:
                # The noise scale needs ‖.grad‖² now (plain or DDP: synced, the same on
                # every rank); one pass serves it and the finite check, as a finite norm
                # proves finite gradients.
                tally = tally._replace(sum_of_squares=self._local_sum_of_squares())
            # A decision taken before the backward never saw the gradients: check them now.
            if (
                self.measures_gradients
                or math.isfinite(tally.sum_of_squares)
                or self._agree_finite(grads)
            ):
                if self._noise is not None:  # before the sum becomes the mean
                    self._noise.close(tally, self._mode == "num_items", self._unit_items())
                divide_(grads, tally.mean_divisor)
                self._ready = True
                self._optimizer_steps += 1
                return
        self.model.zero_grad(set_to_none=True)
        self._micro_steps, self._items = 0, 0
        self._dropped_batches += 1
