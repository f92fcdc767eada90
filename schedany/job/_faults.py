"""Fault injection for the tests of crash, torn write, full disk and hang: real faults at a
chosen step (docs/operations.md says what each one leaves behind).

The environment variables below arm one fault. The reference trainer calls
:func:`maybe_inject_fault` after every optimizer step (and its checkpoint, if due), and
:mod:`schedany.job.checkpoint` calls :func:`maybe_inject_write_fault` half-way through
writing each rank's file of a checkpoint.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

FAULT_STEP_ENV = "SCHEDANY_FAULT_AT_STEP"
"""Fault injection for tests: at optimizer step N ..."""
FAULT_RANK_ENV = "SCHEDANY_FAULT_RANK"
"""... the process of this global rank (default 0) ..."""
FAULT_KIND_ENV = "SCHEDANY_FAULT_KIND"
"""... does one of :data:`FAULT_KINDS` (default ``kill``) ..."""
FAULT_MARKER_ENV = "SCHEDANY_FAULT_MARKER"
"""... once: it first creates this file (default ``<checkpoint_dir>/.fault_injected``),
and a marker that already exists disarms the fault (so a restarted run goes on)."""
FAULT_STALL_ENV = "SCHEDANY_FAULT_STALL_SECONDS"
"""How long a ``stall`` lasts (default 3600 s)."""

FAULT_KINDS = {
    "kill": "after step N (and its checkpoint, if due) SIGKILL itself",
    "kill_in_write": "SIGKILL itself half-way through writing its file of step N's checkpoint",
    "enospc_in_write": "fail that write with ENOSPC (No space left on device), as a full disk",
    "stall": "after step N sleep, taking part in no collective: a rank that stopped responding",
}


def _armed(step: int, rank: int, checkpoint_dir: str | os.PathLike[str] | None) -> str | None:
    """The armed kind if it fires now (marking it fired), else None."""
    at = os.environ.get(FAULT_STEP_ENV)
    if at is None or int(at) != step or rank != int(os.environ.get(FAULT_RANK_ENV, "0")):
        return None
    kind = os.environ.get(FAULT_KIND_ENV, "kill")
    if kind not in FAULT_KINDS:
        raise ValueError(f"{FAULT_KIND_ENV}={kind!r}: expected one of {', '.join(FAULT_KINDS)}")
    marker = Path(
        os.environ.get(FAULT_MARKER_ENV) or Path(checkpoint_dir or ".") / ".fault_injected"
    )
    if marker.exists():
        return None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank}: {kind} at step {step}\n")
    return kind


def maybe_inject_fault(step: int, rank: int, checkpoint_dir: str | None) -> None:
    """After optimizer step ``step``: ``kill`` or ``stall`` if armed for it."""
    if os.environ.get(FAULT_KIND_ENV, "kill") not in ("kill", "stall"):
        return
    kind = _armed(step, rank, checkpoint_dir)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stall":
        time.sleep(float(os.environ.get(FAULT_STALL_ENV, "3600")))


def maybe_inject_write_fault(
    step: int, rank: int, directory: str | os.PathLike[str], file: Path
) -> None:
    """Half-way through writing ``file`` of step ``step``'s checkpoint: ``kill_in_write``
    or ``enospc_in_write`` if armed for it."""
    if os.environ.get(FAULT_KIND_ENV) not in ("kill_in_write", "enospc_in_write"):
        return
    kind = _armed(step, rank, directory)
    if kind == "kill_in_write":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "enospc_in_write":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
