"""Fault injection for the tests of crash and restart: a real SIGKILL at a chosen step.

The environment variables below arm it; the reference trainer calls
:func:`maybe_inject_fault` after every optimizer step (and its checkpoint, if due).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAULT_STEP_ENV = "SCHEDANY_FAULT_AT_STEP"
"""Fault injection for tests: after optimizer step N (and its checkpoint, if due) ..."""
FAULT_RANK_ENV = "SCHEDANY_FAULT_RANK"
"""... the process of this global rank (default 0) kills itself with SIGKILL, ..."""
FAULT_MARKER_ENV = "SCHEDANY_FAULT_MARKER"
"""... once: it first creates this file (default ``<checkpoint_dir>/.fault_injected``),
and a marker that already exists disarms the fault (so a restarted run goes on)."""


def maybe_inject_fault(step: int, rank: int, checkpoint_dir: str | None) -> None:
    at = os.environ.get(FAULT_STEP_ENV)
    if at is None or int(at) != step or rank != int(os.environ.get(FAULT_RANK_ENV, "0")):
        return
    marker = Path(
        os.environ.get(FAULT_MARKER_ENV) or Path(checkpoint_dir or ".") / ".fault_injected"
    )
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself after step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
