"""A checkpoint's files: written atomically (temporary file, fsync, rename), and their
size and sha256 for its manifest (see :mod:`schedany.job.checkpoint`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, midway: Callable[[], None] | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then ``os.replace``.
    ``midway`` runs after the first half is written (the fault-injection point)."""
    tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data[: len(data) // 2])
        if midway is not None:
            fh.flush()
            midway()
        fh.write(data[len(data) // 2 :])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
