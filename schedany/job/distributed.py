"""Process-group set-up, model wrapping (none / DDP / FSDP2) and small rank helpers.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
without it the job is one process and every helper here is a cheap no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

__all__ = [
    "DistEnv",
    "RankFailure",
    "Strategy",
    "any_rank",
    "barrier",
    "collective_device",
    "detect_env",
    "from_rank0",
    "init_distributed",
    "is_rank0",
    "resolve_strategy",
    "teardown",
    "unwrap_model",
    "wrap_model",
]

Strategy = Literal["auto", "none", "ddp", "fsdp"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its ranks and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    under_torchrun: bool
    """True when ``WORLD_SIZE`` was in the environment (``torchrun`` sets it, even to 1)."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def detect_env(device: str | torch.device | None = None) -> DistEnv:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; starts nothing.

    ``device=None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; a
    CUDA device on a machine without CUDA is a ``ConfigError`` at ``train.device``.
    """
    under_torchrun = "WORLD_SIZE" in os.environ
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "train.device", f"{device!r} asked for, but CUDA is not available on this machine"
        )
    return DistEnv(rank, world_size, local_rank, torch.device(device), under_torchrun)


def init_distributed(
    device: str | torch.device | None = None,
    *,
    init_method: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> DistEnv:
    """Detect the environment and, under ``torchrun``, start the default process group.

    Backend: ``nccl`` for a CUDA device, ``gloo`` otherwise. The group is started
    whenever ``WORLD_SIZE`` is set (also for one process, so ``fsdp`` works under
    ``torchrun --nproc-per-node 1``); an already started group is reused.
    ``init_method`` defaults to ``env://`` (torchrun's ``MASTER_ADDR``/``MASTER_PORT``);
    tests pass ``file://...``. Without one, under torchrun's shared agent store
    (``TORCHELASTIC_USE_AGENT_STORE=True``) the group starts on a per-restart view of
    that store instead (see :func:`_init_on_restart_store`).
    """
    env = detect_env(device)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.under_torchrun and not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        if init_method is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _init_on_restart_store(env, backend, timeout)
        else:
            dist.init_process_group(
                backend=backend,
                init_method=init_method,
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                device_id=env.device if backend == "nccl" else None,
            )
    return env


def _init_on_restart_store(env: DistEnv, backend: str, timeout: timedelta) -> None:
    """Start the process group on a per-restart view of torchrun's store.

    Since torch 2.5 the workers share torchrun's rendezvous TCPStore and, after
    ``--max-restarts`` restarts the group, read keys the previous attempt left there
    (pytorch/pytorch#135712): gloo then dials a dead peer and hangs in
    ``connectFullMesh`` (about one restart in three on CPU here). Prefixing the store
    with ``TORCHELASTIC_RESTART_COUNT``, as torch did before 2.5, isolates attempts.
    The count is per agent, so this is exact on one node; across nodes launch with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (then torchrun does not set
    ``TORCHELASTIC_USE_AGENT_STORE`` and this is not called).
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"/schedany/attempt_{attempt}", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=env.device if backend == "nccl" else None,
    )


def resolve_strategy(strategy: Strategy, world_size: int) -> Literal["none", "ddp", "fsdp"]:
    """``auto`` is ``ddp`` when ``world_size > 1``, else ``none``; others pass through."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy not in ("none", "ddp", "fsdp"):
        raise ConfigError(
            "distributed.strategy", f"expected one of auto, none, ddp, fsdp, got {strategy!r}"
        )
    return strategy


def wrap_model(model: nn.Module, strategy: Strategy, env: DistEnv) -> nn.Module:
    """Move ``model`` to ``env.device`` and wrap it for ``strategy``.

    ``ddp`` returns a ``DistributedDataParallel``; ``fsdp`` applies FSDP2
    ``fully_shard`` to every child of ``model.blocks`` (when it has one) and then to the
    root, in place, on a 1-D mesh over all ranks, and returns the same module. Build
    the optimizer from the returned module's parameters *after* this call. ``ddp`` and
    ``fsdp`` need a started process group (:func:`init_distributed` under ``torchrun``).
    """
    resolved = resolve_strategy(strategy, env.world_size)
    model = model.to(env.device)
    if resolved == "none":
        if env.is_distributed:
            raise ConfigError(
                "distributed.strategy",
                f"'none' cannot train with world_size={env.world_size}; use 'ddp' or 'fsdp'",
            )
        return model
    if not dist.is_initialized():
        raise ConfigError(
            "distributed.strategy", f"{resolved!r} needs a process group; launch with torchrun"
        )
    if resolved == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (dist.get_world_size(),))
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module: ``.module`` of a DDP wrapper; an FSDP2 module is already it."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_rank0() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when a process group is up; otherwise nothing."""
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce); ``flag`` without a group."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class RankFailure(RuntimeError):
    """A distributed run failed on this rank between two optimizer steps.

    The message names the last completed step and the process-group timeout; the
    original error is the ``__cause__``. Under a process group a collective that times
    out or loses its peer raises a plain ``RuntimeError`` (gloo, NCCL), which is why the
    job wraps every ``RuntimeError`` of its loop in this, whatever its wording."""

    def __init__(self, rank: int, step: int, timeout: timedelta, error: BaseException) -> None:
        self.rank, self.step = rank, step
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        super().__init__(
            f"rank {rank} failed after optimizer step {step} (in step {step + 1}, or in the "
            f"evaluation or checkpoint after step {step}): {first_line}. A timeout or a "
            "closed connection means another rank stopped responding or died; the job "
            f"waits {timeout.total_seconds():g} s for a collective "
            "(distributed.timeout_minutes)"
        )


def from_rank0(value: int) -> int:
    """Rank 0's ``value`` on every rank (one broadcast); ``value`` without a process group."""
    if not dist.is_initialized():
        return value
    flag = torch.tensor([value], device=collective_device())
    dist.broadcast(flag, src=0)
    return int(flag.item())


def collective_device() -> torch.device:
    """Where small collective tensors must live: the current CUDA device for nccl, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def teardown() -> None:
    """Destroy the default process group if one is up; safe to call twice."""
    if dist.is_initialized():
        dist.destroy_process_group()
