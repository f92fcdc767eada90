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

import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# This module is the public face; the shared layout and the DCP half are private.
from ._checkpoint_files import (
    CheckpointError,
    CheckpointRef,
    _check_keep_last,
    _digest,
    _load_plain,
    _manifest,
    _prune,
    _read_verified,
    _ref,
    _serialize,
    _write_atomic,
    latest_valid_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from ._dcp_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint

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

# Defined in _checkpoint_files; tracebacks and pickles name their public home.
CheckpointError.__module__ = CheckpointRef.__module__ = __name__


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
