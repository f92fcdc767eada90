"""Distributed checkpoints: model + optimizer through ``torch.distributed.checkpoint``.

The layout is described in :mod:`schedany.job.checkpoint`, which re-exports
:func:`save_distributed_checkpoint` and :func:`load_distributed_checkpoint`. Loading
unpickles DCP's ``.metadata`` against an allowlist and its non-tensor items with
``weights_only=True`` first; optimizer hyperparameter keys added with
``extend_optimizer`` are restored too.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._checkpoint_files import (
    _MANIFEST,
    CheckpointError,
    CheckpointRef,
    _check_keep_last,
    _digest,
    _fsync_dir,
    _load_plain,
    _manifest,
    _prune,
    _read_verified,
    _ref,
    _remove,
    _serialize,
    _write_atomic,
)
from .distributed import barrier, collective_device, is_rank0

__all__ = ["load_distributed_checkpoint", "save_distributed_checkpoint"]

_STATE = "state.pt"


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


@contextlib.contextmanager
def _quiet_without_process_group() -> Iterator[None]:
    # DCP warns on every call without a process group, even when asked for no_dist.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is .*single process", UserWarning)
        yield


def save_distributed_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    *,
    rank_state: Mapping[str, Any] | None = None,
    keep_last: int = 3,
) -> CheckpointRef:
    """Collective: save model + optimizer with DCP, plus plain ``state`` and ``rank_state``.

    Call on every rank, at an optimizer-step boundary. ``model`` may be plain, DDP or
    FSDP2. ``state`` (schedule, controller, data cursor, step: the same on every rank)
    is written by rank 0; ``rank_state`` (e.g. :func:`capture_rng_state`) by each rank.
    Everything lands in ``.tmp.step_N/``; rank 0 writes the manifest last and renames
    the folder to ``step_N/``, so a crash at any point leaves nothing that loads.
    ``directory`` must be one filesystem shared by all ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _check_keep_last(keep_last)
    rank = dist.get_rank() if dist.is_initialized() else 0
    shared = _serialize(
        {"state": dict(state), "param_groups": _hyperparameters(optimizer)}, "state"
    )  # checked on every rank, so a bad state fails everywhere before any collective
    own = None if rank_state is None else _serialize(dict(rank_state), "rank_state")
    root = Path(directory)
    ref = _ref(root, step, distributed=True)
    tmp = root / f".tmp.{ref.path.name}"
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_without_process_group():
        dcp.save(
            {"model": model_sd, "optimizer": optim_sd},
            checkpoint_id=tmp,
            no_dist=not dist.is_initialized(),
        )
    if own is not None:
        _write_atomic(tmp / f"rank_{rank:05d}.pt", own)
    if is_rank0():
        _write_atomic(tmp / _STATE, shared)
    barrier()
    if is_rank0():
        files = {p.name: _digest(p.read_bytes()) for p in sorted(tmp.iterdir()) if p.is_file()}
        world = dist.get_world_size() if dist.is_initialized() else 1
        _write_atomic(tmp / _MANIFEST, _manifest(step, "distributed", files, world_size=world))
        if ref.path.exists():  # rewriting a step
            _remove(ref)
        os.rename(tmp, ref.path)
        _fsync_dir(root)
        _prune(root, keep_last)
    barrier()
    return ref


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Loads DCP's ``.metadata`` only if it names nothing but DCP's own data classes."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or (
                module in _METADATA_MODULES
                and isinstance(getattr(sys.modules[module], name, None), type)
            )
            or (module == "pathlib" and name.endswith("Path"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _safe_load_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        # DefaultLoadPlanner unpickles non-tensor items with weights_only=False; a
        # weights_only=True pass over the same bytes first refuses anything else.
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            _load_plain(value.getvalue(), f"DCP item {read_item.dest_index.fqn}")
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


def load_distributed_checkpoint(
    ref: CheckpointRef, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective: verify ``ref``, load it into ``model`` and ``optimizer``.

    Returns ``(state, rank_state)``: rank 0's saved ``state`` and this rank's own
    ``rank_state`` (``None`` if it saved none, e.g. a different world size). Before the
    DCP load, every optimizer hyperparameter key the checkpoint holds and the optimizer
    lacks (keys added with ``extend_optimizer``) is added with its saved value, since DCP
    only fills keys the target already has; afterwards every saved key is checked.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not ref.distributed:
        raise CheckpointError(f"checkpoint {ref.path} is a single-process one; use load_checkpoint")
    problem = ""
    if is_rank0():
        try:
            for name, data in _read_verified(ref).items():
                if name.endswith(".metadata"):
                    _MetadataUnpickler(io.BytesIO(data)).load()
        except (CheckpointError, pickle.UnpicklingError, EOFError) as exc:
            problem = str(exc)
    if dist.is_initialized():
        flag = torch.tensor([int(bool(problem))], device=collective_device())
        dist.broadcast(flag, src=0)
        if flag.item() and not problem:
            problem = f"checkpoint {ref.path}: rank 0 found it corrupt"
    if problem:
        raise CheckpointError(problem)
    shared = _load_plain((ref.path / _STATE).read_bytes(), f"checkpoint {ref.path / _STATE}")
    saved_groups = shared["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint {ref.path}: {len(saved_groups)} param groups saved, "
            f"optimizer has {len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups):
        for key, value in saved.items():
            if key not in group:  # as extend_optimizer would: in the group and the defaults
                group[key] = value
                optimizer.defaults.setdefault(key, value)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_without_process_group():
        dcp.load(
            {"model": model_sd, "optimizer": optim_sd},
            checkpoint_id=ref.path,
            planner=_safe_load_planner(),
            no_dist=not dist.is_initialized(),
        )
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        missing = sorted(set(saved) - set(group))
        if missing:
            raise CheckpointError(f"checkpoint {ref.path}: param group {i} lost keys {missing}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    own_path = ref.path / f"rank_{rank:05d}.pt"
    own = (
        _load_plain(own_path.read_bytes(), f"checkpoint {own_path}") if own_path.exists() else None
    )
    return shared["state"], own
