"""Atomic, checksummed checkpoints at optimizer-step boundaries: one layout at every world size.

The checkpoint of optimizer step 10 is the folder ``step_00000010/``:

* the ``torch.distributed.checkpoint`` (DCP) files of model + optimizer (``.metadata``,
  ``*.distcp``);
* ``state.pt``: rank 0's plain state (schedule, controller, data cursor, step) and the
  optimizer's hyperparameters;
* ``rank_00003.pt``: each rank's own extras (its RNG), where it saved any;
* ``MANIFEST.json``: every file's size and sha256, and the world size that wrote it.

One process (no process group) and N ranks under torchrun write the same layout, and DCP
reshards on load, so model and optimizer saved at one world size load at another. All
files are written into ``.tmp.step_00000010/``, the manifest last, and the folder is then
renamed into place: a crash at any point leaves nothing that loads. A write that fails on
any rank (a full disk) fails on every rank with :class:`CheckpointError`, the partial
folder removed and the checkpoints already there untouched. A checkpoint without a
manifest is incomplete and never loads; one whose bytes differ from it is refused with
:class:`CheckpointError`. Loading never unpickles arbitrary objects: plain files load with
``weights_only=True``, DCP's ``.metadata`` against an allowlist (:mod:`._safe_load`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._faults import maybe_inject_write_fault
from ._files import digest, fsync_dir, write_atomic
from ._rng import capture_rng_state, restore_rng_state
from ._safe_load import check_dcp_metadata, load_plain, plain_bytes, safe_load_planner
from .distributed import any_rank, barrier, from_rank0, is_rank0

__all__ = [
    "CheckpointError",
    "CheckpointRef",
    "capture_rng_state",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "resumable_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

_FORMAT = "schedany-checkpoint/1"
_MANIFEST = "MANIFEST.json"
_STATE = "state.pt"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or holds something unloadable."""


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint on disk (its manifest exists; its bytes are not yet checked)."""

    step: int
    path: Path
    """The checkpoint's folder, ``step_XXXXXXXX/``."""

    @property
    def manifest(self) -> Path:
        return self.path / _MANIFEST


def _ref(directory: Path, step: int) -> CheckpointRef:
    return CheckpointRef(step, directory / f"step_{step:08d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# --- files -------------------------------------------------------------------------


def _read_verified(ref: CheckpointRef) -> dict[str, bytes]:
    """Check the manifest and every file it lists; return the bytes of the ``.metadata``
    files (the only ones read again, for their pickle check), not the whole checkpoint."""
    try:
        manifest = json.loads(ref.manifest.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ref.path}: no manifest, so it is incomplete") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {ref.path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {ref.path}: manifest is not {_FORMAT}")
    if manifest.get("step") != ref.step:
        raise CheckpointError(
            f"checkpoint {ref.path}: manifest says step {manifest.get('step')!r}, name says "
            f"{ref.step}"
        )
    contents: dict[str, bytes] = {}
    for name, expected in manifest["files"].items():
        try:
            data = (ref.path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ref.path}: file {name} is missing") from None
        got = digest(data)
        if got != expected:
            raise CheckpointError(
                f"checkpoint {ref.path}: file {name} is corrupt or truncated (expected "
                f"{expected['bytes']} bytes, sha256 {expected['sha256'][:12]}…; found "
                f"{got['bytes']} bytes, sha256 {got['sha256'][:12]}…)"
            )
        if name.endswith(".metadata"):
            contents[name] = data
    return contents


def _load_file(path: Path) -> Any:
    try:
        return load_plain(path.read_bytes(), f"checkpoint {path}")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(str(exc)) from exc


# --- listing, verifying, pruning ---------------------------------------------------


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointRef]:
    """Checkpoints in ``directory`` whose manifest exists, newest step first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    refs = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match is not None and (entry / _MANIFEST).is_file():
            refs.append(_ref(root, int(match.group(1))))
    return sorted(refs, key=lambda r: r.step, reverse=True)


def verify_checkpoint(ref: CheckpointRef) -> None:
    """Raise :class:`CheckpointError` unless every file matches the manifest."""
    _read_verified(ref)


def latest_valid_checkpoint(directory: str | os.PathLike[str]) -> CheckpointRef | None:
    """The newest checkpoint whose files match their manifest, or ``None``.

    Corrupt or truncated newer ones are skipped with a warning (and left on disk for a
    look). Under a process group rank 0 decides and broadcasts, so all ranks agree;
    call it on every rank.
    """
    choice: CheckpointRef | None = None
    if is_rank0():
        for ref in list_checkpoints(directory):
            try:
                verify_checkpoint(ref)
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint: {exc}", RuntimeWarning, stacklevel=2)
                continue
            choice = ref
            break
    step = from_rank0(choice.step if choice else -1)
    return None if step < 0 else _ref(Path(directory), step)


def resumable_checkpoint(directory: str | os.PathLike[str]) -> CheckpointRef | None:
    """:func:`latest_valid_checkpoint`, or None where ``directory`` holds no checkpoint;
    :class:`CheckpointError` where it holds some but none is valid (rather than silently
    starting over). Call it on every rank."""
    ref = latest_valid_checkpoint(directory)
    if ref is None:
        found = list_checkpoints(directory)
        if found:
            raise CheckpointError(
                f"{directory}: holds {len(found)} checkpoint(s) (newest: {found[0].path}) "
                "but none is valid; move them away to start over"
            )
    return ref


def _remove(path: Path) -> None:
    (path / _MANIFEST).unlink(missing_ok=True)  # first, so a half-removed one is incomplete
    shutil.rmtree(path, ignore_errors=True)


def _prune(directory: Path, keep_last: int) -> None:
    for ref in list_checkpoints(directory)[keep_last:]:
        _remove(ref.path)
    for entry in directory.iterdir():
        if entry.name.startswith(".tmp."):  # left by a crash mid-write
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        elif _NAME.match(entry.name) and not (entry / _MANIFEST).is_file():
            shutil.rmtree(entry, ignore_errors=True)  # left by a crash mid-removal


# --- save and load -----------------------------------------------------------------


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _dcp_call(fn: Any, state_dict: dict[str, Any], path: Path, **kwargs: Any) -> None:
    """``fn`` (``dcp.save`` / ``dcp.load``) in one process or on every rank."""
    with warnings.catch_warnings():
        # DCP warns on every call without a process group, even when asked for no_dist.
        warnings.filterwarnings("ignore", "torch.distributed is .*single process", UserWarning)
        fn(state_dict, checkpoint_id=path, no_dist=not dist.is_initialized(), **kwargs)


def _agree_written(problem: BaseException | None, ref: CheckpointRef, tmp: Path) -> None:
    """Raise :class:`CheckpointError` on every rank if writing failed on any (one
    all-reduce, so that no rank waits for another that gave up); rank 0 removes the
    partial folder first. The checkpoints already in the folder are never touched."""
    if not any_rank(problem is not None):
        return
    from torch.distributed.checkpoint import CheckpointException

    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(problem, CheckpointException):  # DCP's wrapper of each rank's error
        problem = next(iter(problem.failures.values()))[0]
    cause = f"{problem}" if problem is not None else "another rank could not write its part"
    raise CheckpointError(
        f"checkpoint {ref.path} could not be written ({cause}); the checkpoints already in "
        f"{ref.path.parent} are intact, so the same command resumes from the newest of them"
    ) from problem


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    *,
    rank_state: Mapping[str, Any] | None = None,
    keep_last: int = 3,
) -> CheckpointRef:
    """Save model + optimizer with DCP, plus plain ``state`` and ``rank_state``.

    Call at an optimizer-step boundary; under a process group it is collective (call on
    every rank, with ``directory`` on one filesystem all ranks share), in one process it
    uses no collective. ``model`` may be plain, DDP or FSDP2. ``state`` (the same on every
    rank: schedule, controller, data cursor, step) is written by rank 0, ``rank_state``
    (e.g. ``{"rng": capture_rng_state()}``) by each rank. Both may hold only tensors,
    numbers, strings, None, dicts, lists and tuples: a ``TypeError`` names the first other
    thing, on every rank, before anything is written. Afterwards all but the newest
    ``keep_last`` checkpoints are removed; keep ``keep_last >= 2`` so a corrupt newest one
    has a fallback. If any rank cannot write its part (``OSError``: a full disk, say),
    every rank raises :class:`CheckpointError` and the earlier checkpoints stay as they were.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"checkpoint: keep_last must be an integer >= 1, got {keep_last!r}")
    shared = plain_bytes({"state": dict(state), "param_groups": _hyperparameters(optimizer)}, "")
    own = None if rank_state is None else plain_bytes(dict(rank_state), "rank_state")
    root = Path(directory)
    ref = _ref(root, step)
    tmp = root / f".tmp.{ref.path.name}"
    problem: BaseException | None = None
    if is_rank0():
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            problem = exc
    _agree_written(problem, ref, tmp)  # also the barrier before any rank writes into tmp
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _dcp_call(dcp.save, {"model": model_sd, "optimizer": optim_sd}, tmp)
        if own is not None:
            mine = tmp / _rank_file(_rank())
            write_atomic(mine, own, lambda: maybe_inject_write_fault(step, _rank(), root, mine))
        if is_rank0():
            write_atomic(tmp / _STATE, shared)
    except (OSError, dcp.CheckpointException) as exc:
        problem = exc
    _agree_written(problem, ref, tmp)
    if is_rank0():
        try:
            files = {p.name: digest(p.read_bytes()) for p in sorted(tmp.iterdir()) if p.is_file()}
            world = dist.get_world_size() if dist.is_initialized() else 1
            body = {"format": _FORMAT, "step": step, "world_size": world, "files": files}
            write_atomic(tmp / _MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())
            if ref.path.exists():  # rewriting a step
                _remove(ref.path)
            os.rename(tmp, ref.path)
            fsync_dir(root)
        except OSError as exc:
            problem = exc
    _agree_written(problem, ref, tmp)
    if is_rank0():
        _prune(root, keep_last)
    barrier()
    return ref


def _verify_on_rank0(ref: CheckpointRef) -> None:
    """Rank 0 checks every byte and the ``.metadata`` pickle; every rank learns the verdict."""
    problem = ""
    if is_rank0():
        try:
            for name, data in _read_verified(ref).items():
                check_dcp_metadata(data, f"checkpoint {ref.path / name}")
        except (CheckpointError, pickle.UnpicklingError) as exc:
            problem = str(exc)
    if from_rank0(int(bool(problem))) and not problem:
        problem = f"checkpoint {ref.path}: rank 0 found it corrupt"
    if problem:
        raise CheckpointError(problem)


def load_checkpoint(
    ref: CheckpointRef, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Verify ``ref`` and load it into ``model`` and ``optimizer``; collective under a group.

    Returns ``(state, rank_state)``: the saved ``state``, and this rank's ``rank_state`` —
    rank 0's where this rank saved none (a resume at a larger world size), ``None`` where
    no rank saved one. Before the DCP load, every optimizer hyperparameter key the
    checkpoint holds and the optimizer lacks (keys added with ``extend_optimizer``) is
    added with its saved value, since DCP only fills keys the target already has;
    afterwards every saved key is checked. A model or optimizer that does not match the
    checkpoint raises what DCP found (``ValueError``, ``RuntimeError``, ...).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _verify_on_rank0(ref)
    shared = _load_file(ref.path / _STATE)
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
    try:
        _dcp_call(
            dcp.load,
            {"model": model_sd, "optimizer": optim_sd},
            ref.path,
            planner=safe_load_planner(),
        )
    except dcp.CheckpointException as exc:
        # DCP wraps each rank's error with its traceback text; raise the error itself.
        cause = next(iter(exc.failures.values()))[0]
        if isinstance(cause, pickle.UnpicklingError):
            raise CheckpointError(str(cause)) from exc
        raise cause from exc
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        missing = sorted(set(saved) - set(group))
        if missing:
            raise CheckpointError(f"checkpoint {ref.path}: param group {i} lost keys {missing}")
    for rank in dict.fromkeys((_rank(), 0)):  # this rank's own, else rank 0's
        if (ref.path / _rank_file(rank)).exists():
            return shared["state"], _load_file(ref.path / _rank_file(rank))
    return shared["state"], None
