"""The data-parallel group a controller talks to, and the two collectives it uses.

A controller never communicates more than once per decision (see
``docs/control_loops.md``): one packed all-gather per micro-step (counts, norms, and a
:class:`Header` that proves the ranks are in step) or, for a sketched norm, one all-reduce
of the sketch that carries the items and a check of the header; and, for sharded
gradients only, one 1-element all-reduce of a non-finite flag. A collective that fails
(usually a timeout because another rank stopped calling ``accumulate()``) is re-raised as
a ``RuntimeError`` that says so.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._grad_sync import ModelKind

_CONTROLLERS: dict[int, str] = {}  # a header's controller id -> the controller's name
# Columns of an exchanged row: [controller, mode, logical batch, micro-step] must agree,
# then this rank's items, then the target's bits (must agree), then the shares' bits.
_AGREED, _ITEMS, _TARGET, _SHARES = 4, 4, 5, 6


def _bits(value: float) -> int:
    return struct.unpack("=q", struct.pack("=d", value))[0]  # torch's view(int64), in Python


def _float(bits: int) -> float:
    return struct.unpack("=d", struct.pack("=q", bits))[0]


def _controller_id(name: str) -> int:
    return zlib.crc32(name.encode())  # the same in every process, unlike hash()


def register_controller(name: str) -> None:
    """Let a header from the controller ``name`` be reported by name."""
    known = _CONTROLLERS.setdefault(_controller_id(name), name)
    if known != name:
        raise TypeError(f"{name}: its header id is taken by {known}; rename it")


def _accelerator() -> torch.device:
    """The current device of the backend's accelerator (for a model-less group on nccl)."""
    return torch.device("cuda", torch.cuda.current_device())


class Header(NamedTuple):
    """What every rank's row of a micro-step's all-gather must agree on."""

    controller: str
    num_items: bool
    logical_batch: int
    micro_step: int
    target: float


def _digest(header: Header) -> list[int]:
    """The header as four 16-bit numbers (a 64-bit hash): small enough that their sums
    and sums of squares over any realistic world size are exact in float64."""
    data = struct.pack(
        "=I?qqd",
        _controller_id(header.controller),
        header.num_items,
        header.logical_batch,
        header.micro_step,
        header.target,
    )
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return [(value >> (16 * i)) & 0xFFFF for i in range(4)]


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
        self, model: nn.Module | None, kind: ModelKind, process_group: Any | None, owner: str
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
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # Silently local, the controller would count one rank's items and norms:
                # a logical batch W times too large. The usual cause is passing the
                # module that a trainer (Lightning's DDP strategy) wrapped, not the wrapper.
                raise ValueError(
                    f"{owner}: model is a plain {type(model).__name__}, but a process group "
                    f"of {dist.get_world_size()} ranks is initialised; pass the model that "
                    "trains, wrapped in DistributedDataParallel or FSDP (fully_shard), so "
                    "that the controller counts every rank (under Lightning: "
                    "trainer.strategy.model)"
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
        if dist.get_backend(self.group) != "gloo":
            param = None if model is None else next(iter(model.parameters()), None)
            self.device = param.device if param is not None else _accelerator()

    def all_gather(self, local: Tensor, where: str) -> Tensor:
        """Every rank's ``local`` (1-D), as rows of a ``(size, n)`` CPU tensor."""
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
        # One int64 row: the header and items, the target's float64 bits, then the shares'.
        row = [_controller_id(header.controller), int(header.num_items), header.logical_batch]
        row += [header.micro_step, items, _bits(header.target)]
        local = torch.tensor(row, dtype=torch.int64)
        if shares is not None:
            bits = shares.to(torch.float64).reshape(-1).view(torch.int64)
            local = torch.cat([local.to(bits.device), bits])
        rows = self.all_gather(local, where)
        table = rows.tolist()  # one host copy; the checks below are plain Python
        if any(r[:_AGREED] != table[0][:_AGREED] for r in table):
            ranks = ", ".join(f"rank {i}: {_describe(r[:_AGREED])}" for i, r in enumerate(table))
            raise RuntimeError(
                f"{self.owner}: ranks diverged: their accumulate() calls no longer line up "
                f"({ranks}). Every rank must run the same micro-steps, pass num_items on "
                "all of them or none, and resume from the same checkpoint."
            )
        if any(r[_TARGET] != table[0][_TARGET] for r in table):
            targets = [_float(r[_TARGET]) for r in table]
            raise RuntimeError(
                f"{self.owner}: ranks diverged: they read different targets {targets} "
                f"from {key!r}; step the schedule on every rank"
            )
        shares_of_all = rows[:, _SHARES:].contiguous().view(torch.float64)
        return sum(r[_ITEMS] for r in table), shares_of_all

    def sum(self, values: list[float], where: str) -> list[float]:
        """``values`` summed over ranks (one float64 all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._run("all-reduce", where, lambda: dist.all_reduce(t, group=self.group))
        return t.tolist()

    def all_reduce_sum(
        self, header: Header, items: int, vector: Tensor, where: str, key: str
    ) -> tuple[int, Tensor]:
        """``items`` and ``vector`` summed over ranks in one float64 all-reduce.

        The headers are checked in the same collective: each rank adds its header's
        digest ``d`` and ``d²``, and the sums equal ``W·d`` and ``W·d²`` for a rank's own
        ``d`` only if every rank sent the same ``d`` (the sums are the same everywhere, so
        the ranks all pass or all fail). If they fail, one all-gather of the headers
        raises the same error as :meth:`exchange` on every rank.
        """
        digest = _digest(header)
        tail = [items, *digest, *(d * d for d in digest)]
        local = torch.cat(
            [
                vector.reshape(-1).to(device=self.device, dtype=torch.float64),
                torch.tensor(tail, dtype=torch.float64, device=self.device),
            ]
        )
        self._run("all-reduce", where, lambda: dist.all_reduce(local, group=self.group))
        summed = local[-len(tail) :].tolist()
        if summed[1:] != [float(self.size * v) for v in tail[1:]]:
            self.exchange(header, items, None, where, key)  # raises: the headers differ
            raise RuntimeError(f"{self.owner}: ranks diverged at {where}")  # pragma: no cover
        return int(summed[0]), local[: -len(tail)]

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
