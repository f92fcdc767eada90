"""Preemption: SIGTERM or SIGUSR1 make the job checkpoint one agreed step and stop.

A signal handler only raises the ``"preempt"`` :class:`~._step_flags.StepFlags` flag of
this rank; the trainer agrees on the flags once per optimizer step, so every rank learns
of a signal that reached any of them at the same step, checkpoints it and raises
:class:`Preempted`; ``schedany train`` then prints ``preempted at step N`` and exits with
code 143. See docs/operations.md.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from ._step_flags import StepFlags

PREEMPT = "preempt"
"""The step flag a preemption signal raises."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM: what SLURM, Kubernetes and torchrun send before they kill; SIGUSR1: what
``sbatch --signal=USR1@<seconds>`` sends ahead of the time limit."""


class Preempted(Exception):
    """The run stopped at an optimizer-step boundary because a rank got a preemption
    signal; ``checkpoint`` holds that step (None without ``train.checkpoint_dir``)."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        where = (
            f"checkpoint {checkpoint}; run the same command to resume"
            if checkpoint
            else "nothing saved: train.checkpoint_dir is not set"
        )
        super().__init__(f"preempted at step {step} ({where})")


@contextlib.contextmanager
def preemption_signals(flags: StepFlags) -> Iterator[None]:
    """Inside the block, SIGTERM and SIGUSR1 raise ``flags``' ``"preempt"`` flag instead
    of ending the process; the previous handlers are restored on the way out.

    Only the main thread may install signal handlers, so elsewhere (a Ray Tune trial runs
    in a thread of its worker) this does nothing and the signals keep their handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flags.raise_flag(PREEMPT)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            # None: a handler installed from C, which Python cannot reinstall.
            signal.signal(sig, signal.SIG_DFL if old is None else old)
