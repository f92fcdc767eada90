"""The data-parallel group a controller talks to, and the two collectives it uses.

A controller never communicates more than once per decision (see
``docs/control_loops.md``): one packed all-gather per micro-step (counts, norms, and a
:class:`Header` that proves the ranks are in step) and, for sharded gradients only, one
1-element all-reduce of a non-finite flag. A collective that fails (usually a timeout
because another rank stopped calling ``accumulate()``) is re-raised as a ``RuntimeError``
that says so.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._grad_sync import ModelKind

_CONTROLLERS: dict[int, str] = {}  # a header's controller id -> the controller's name


def _controller_id(name: str) -> int:
    return zlib.crc32(name.encode())  # the same in every process, unlike hash()


def register_controller(name: str) -> None:
    """Let a header from the controller ``name`` be reported by name."""
    known = _CONTROLLERS.setdefault(_controller_id(name), name)
    if known != name:
        raise TypeError(f"{name}: its header id is taken by {known}; rename it")


@dataclass(frozen=True)
class Header:
    """What every rank's row of a micro-step's all-gather must agree on."""

    controller: str
    num_items: bool
    logical_batch: int
    micro_step: int
    target: float


def _describe(ids: list[int]) -> str:
    controller, num_items, batch, micro_step = ids
    name = _CONTROLLERS.get(controller, f"controller #{controller}")
    with_items = " with num_items" if num_items else ""
    return f"{name}{with_items}, logical batch {batch}, micro-step {micro_step}"


class DataParallelGroup:
    """``process_group`` resolved for ``model``; size 1 (no communication) when local.

    The default group is DDP's or FSDP1's own, else the default process group (FSDP2).
    Collectives run on the CPU for gloo, else on the parameters' device.
    """

    def __init__(
        self, model: nn.Module, kind: ModelKind, process_group: Any | None, owner: str
    ) -> None:
        self.owner = owner
        self.group: Any | None = None
        self.size = 1
        self.device = torch.device("cpu")
        if kind == "plain":
            if process_group is not None:
                raise ValueError(
                    f"{owner}: process_group={process_group!r} was given, but model is a plain "
                    f"{type(model).__name__} whose gradients nothing averages across ranks; "
                    "wrap it in DistributedDataParallel or fully_shard, or leave "
                    "process_group=None"
                )
            return
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"{owner}: process_group must be a torch.distributed.ProcessGroup, "
                f"got {type(process_group).__name__}"
            )
        self.group = process_group
        if self.group is None and kind in ("ddp", "fsdp1"):
            self.group = getattr(model, "process_group", None)
        self.size = dist.get_world_size(self.group)
        param = next(iter(model.parameters()), None)
        if param is not None and dist.get_backend(self.group) != "gloo":
            self.device = param.device

    def all_gather(self, local: Tensor, where: str) -> Tensor:
        """Every rank's ``local`` (1-D int64), as rows of a ``(size, n)`` CPU tensor."""
        local = local.to(self.device)
        out = torch.empty(self.size * local.numel(), dtype=local.dtype, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._run("all-gather", where, lambda: gather(out, local, group=self.group))
        return out.view(self.size, -1).cpu()

    def exchange(
        self, header: Header, items: int, shares: Tensor | None, where: str, key: str
    ) -> tuple[int, Tensor]:
        """Every rank's ``[header, items, shares]`` in one all-gather.

        Returns ``items`` summed over ranks and every rank's ``shares`` (float64, one row
        per rank). Raises the same error on every rank if the headers disagree (``key``
        names the optimizer key the target was read from).
        """
        ids = [_controller_id(header.controller), int(header.num_items)]
        ids += [header.logical_batch, header.micro_step, items]
        floats = torch.tensor([header.target], dtype=torch.float64)
        if shares is not None:
            floats = torch.cat([floats.to(shares.device), shares.to(torch.float64).reshape(-1)])
        ints = torch.tensor(ids, dtype=torch.int64, device=floats.device)
        # One row of int64: the ids and items, then the floats as their bit patterns.
        rows = self.all_gather(torch.cat([ints, floats.view(torch.int64)]), where)
        columns = len(ids) - 1  # all but items must agree
        agreed = rows[:, :columns]
        if not bool((agreed == agreed[0]).all()):
            ranks = ", ".join(
                f"rank {r}: {_describe(row)}" for r, row in enumerate(agreed.tolist())
            )
            raise RuntimeError(
                f"{self.owner}: ranks diverged: their accumulate() calls no longer line up "
                f"({ranks}). Every rank must run the same micro-steps, pass num_items on "
                "all of them or none, and resume from the same checkpoint."
            )
        values = rows[:, len(ids) :].contiguous().view(torch.float64)
        targets = values[:, 0]
        if not bool((targets == targets[0]).all()):
            raise RuntimeError(
                f"{self.owner}: ranks diverged: they read different targets "
                f"{targets.tolist()} from {key!r}; step the schedule on every rank"
            )
        return int(rows[:, columns].sum()), values[:, 1:]

    def any(self, flag: bool, where: str) -> bool:
        """Whether ``flag`` is true on any rank (a 1-element all-reduce)."""
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        self._run("all-reduce", where, lambda: dist.all_reduce(t, dist.ReduceOp.MAX, self.group))
        return bool(t.item())

    def _run(self, what: str, where: str, collective: Any) -> None:
        try:
            collective()
        except Exception as exc:
            raise RuntimeError(
                f"{self.owner}: ranks diverged or a peer failed: the {what} of {where} did "
                f"not complete ({exc}). Every rank must call accumulate() the same number "
                "of times; a rank that stopped calling it (or crashed) leaves the others "
                "waiting until the process-group timeout."
            ) from exc
