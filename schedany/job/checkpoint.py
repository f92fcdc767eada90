"""Atomic, checksummed checkpoints at optimizer-step boundaries.

Two kinds share one folder and one naming scheme:

* **single** (one process): ``step_00000010.pt`` (``torch.save`` of a plain state
  tree) and its manifest ``step_00000010.json``, written last.
* **distributed**: folder ``step_00000010/`` holding the
  ``torch.distributed.checkpoint`` (DCP) files of model + optimizer, ``state.pt``
  (rank 0's plain state: schedule, controller, data cursor, step, optimizer
  hyperparameters), ``rank_00003.pt`` per-rank extras (RNG), and ``MANIFEST.json``,
  written last inside a temporary folder that is then renamed into place.

A manifest lists every file with its size and sha256; a checkpoint without one is
incomplete and never loads, one whose bytes differ from it is refused with
:class:`CheckpointError`. Loading never unpickles arbitrary objects: plain files use
``torch.load(weights_only=True)``; DCP's non-tensor items are checked with
``weights_only=True`` first and its ``.metadata`` pickle against an allowlist.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import barrier, collective_device, is_rank0

__all__ = [
    "CheckpointError",
    "CheckpointRef",
    "capture_rng_state",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_distributed_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "verify_checkpoint",
]

_FORMAT = "schedany-checkpoint/1"
_MANIFEST = "MANIFEST.json"
_STATE = "state.pt"
_NAME = re.compile(r"^step_(\d{8,})(\.json)?$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or holds something unloadable."""


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint on disk (its manifest exists; its bytes are not yet checked)."""

    step: int
    path: Path
    """The ``.pt`` file of a single checkpoint, the folder of a distributed one."""
    distributed: bool

    @property
    def manifest(self) -> Path:
        return self.path / _MANIFEST if self.distributed else self.path.with_suffix(".json")

    @property
    def root(self) -> Path:
        """The folder the manifest's file names are relative to."""
        return self.path if self.distributed else self.path.parent


def _ref(directory: Path, step: int, distributed: bool) -> CheckpointRef:
    name = f"step_{step:08d}"
    return CheckpointRef(step, directory / (name if distributed else name + ".pt"), distributed)


# --- plain-data checks and file helpers --------------------------------------------

# Exact types: subclasses (numpy floats, namedtuples, defaultdicts, DTensors) would
# pass isinstance and then fail to load with weights_only=True.
_LEAVES = frozenset(
    {Tensor, torch.nn.Parameter, int, float, bool, str, bytes, type(None), torch.dtype}
)


def _check_plain(obj: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first thing ``weights_only=True`` could not load."""
    kind = type(obj)
    if kind in _LEAVES:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, torch.Size):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}; only tensors, "
        "numbers, strings, None, dicts, lists and tuples load with weights_only=True"
    )


def _serialize(obj: Any, where: str) -> bytes:
    _check_plain(obj, where)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then ``os.replace``."""
    tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _manifest(step: int, kind: str, files: dict[str, dict[str, Any]], **extra: Any) -> bytes:
    body = {"format": _FORMAT, "kind": kind, "step": step, "files": files, **extra}
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _read_verified(ref: CheckpointRef) -> dict[str, bytes]:
    """Check the manifest and every file it lists; return the files' bytes."""
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
            f"checkpoint {ref.path}: manifest says step {manifest.get('step')!r}, name says {ref.step}"
        )
    contents: dict[str, bytes] = {}
    for name, expected in manifest["files"].items():
        try:
            data = (ref.root / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ref.path}: file {name} is missing") from None
        got = _digest(data)
        if got != expected:
            raise CheckpointError(
                f"checkpoint {ref.path}: file {name} is corrupt or truncated (expected "
                f"{expected['bytes']} bytes, sha256 {expected['sha256'][:12]}…; found "
                f"{got['bytes']} bytes, sha256 {got['sha256'][:12]}…)"
            )
        contents[name] = data
    return contents


def _load_plain(data: bytes, where: str, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
        raise CheckpointError(f"{where}: cannot be loaded with weights_only=True ({exc})") from exc


# --- listing, verifying, pruning ---------------------------------------------------


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointRef]:
    """Checkpoints in ``directory`` whose manifest exists, newest step first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    refs = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        distributed = match.group(2) is None
        ref = _ref(root, int(match.group(1)), distributed)
        if (distributed and entry.is_dir() and ref.manifest.is_file()) or (
            not distributed and entry.is_file()
        ):
            refs.append(ref)
    return sorted(refs, key=lambda r: (r.step, r.distributed), reverse=True)


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
    if not dist.is_initialized():
        return choice
    # One int64 pair, so the decision is one small collective.
    flag = torch.tensor(
        [choice.step, int(choice.distributed)] if choice else [-1, 0], device=collective_device()
    )
    dist.broadcast(flag, src=0)
    step, distributed = (int(v) for v in flag.tolist())
    return None if step < 0 else _ref(Path(directory), step, bool(distributed))


def _remove(ref: CheckpointRef) -> None:
    ref.manifest.unlink(missing_ok=True)  # first, so a half-removed one is incomplete
    if ref.distributed:
        shutil.rmtree(ref.path, ignore_errors=True)
    else:
        ref.path.unlink(missing_ok=True)


def _prune(directory: Path, keep_last: int) -> None:
    kept = list_checkpoints(directory)
    for ref in kept[keep_last:]:
        _remove(ref)
    complete = {ref.path for ref in kept[:keep_last]}
    for entry in directory.iterdir():
        if entry.name.startswith(".tmp."):  # left by a crash mid-write
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        elif _NAME.match(entry.stem) and entry.suffix == ".pt" and entry not in complete:
            entry.unlink(missing_ok=True)  # a payload whose manifest never got written


def _check_keep_last(keep_last: int) -> None:
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"checkpoint: keep_last must be an integer >= 1, got {keep_last!r}")


# --- single process ----------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike[str], step: int, state: Mapping[str, Any], *, keep_last: int = 3
) -> CheckpointRef:
    """Save ``state`` (a plain tree) as the checkpoint of optimizer step ``step``.

    ``state`` may hold only tensors, numbers, strings, None, dicts, lists and tuples
    (a ``TypeError`` names the first other thing, before anything is written). The
    payload is written atomically, then its manifest; then all but the newest
    ``keep_last`` checkpoints are removed. Keep ``keep_last >= 2`` so a corrupt newest
    one has a fallback.
    """
    _check_keep_last(keep_last)
    payload = _serialize(dict(state), "state")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ref = _ref(root, step, distributed=False)
    ref.manifest.unlink(missing_ok=True)  # rewriting a step: incomplete until done
    _write_atomic(ref.path, payload)
    _write_atomic(ref.manifest, _manifest(step, "single", {ref.path.name: _digest(payload)}))
    _prune(root, keep_last)
    return ref


def load_checkpoint(ref: CheckpointRef, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify and load a single checkpoint's state (``weights_only=True``)."""
    if ref.distributed:
        raise CheckpointError(
            f"checkpoint {ref.path} is distributed; use load_distributed_checkpoint"
        )
    data = _read_verified(ref)[ref.path.name]
    return _load_plain(data, f"checkpoint {ref.path}", map_location)


# --- RNG -----------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), Python and (if imported) NumPy RNG states, as plain data."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "internal": torch.tensor(internal),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng_state`; entries for an absent backend are ignored."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        s = state["numpy"]
        np.random.set_state(
            (
                s["kind"],
                s["keys"].numpy().astype(np.uint32),
                s["pos"],
                s["has_gauss"],
                s["cached_gaussian"],
            )
        )


# --- distributed (DCP) ---------------------------------------------------------------


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
