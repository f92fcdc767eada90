"""The on-disk layout both checkpoint kinds share (see :mod:`schedany.job.checkpoint`).

Step names, manifests, atomic writes, sha256 verification, listing and pruning. The
single-process half (:mod:`schedany.job.checkpoint`) and the DCP half
(:mod:`schedany.job._dcp_checkpoint`) both build on it, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import collective_device, is_rank0

__all__ = [
    "CheckpointError",
    "CheckpointRef",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
]

_FORMAT = "schedany-checkpoint/1"
_MANIFEST = "MANIFEST.json"
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
