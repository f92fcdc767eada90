"""Fixtures shared across test files.

``tiny_reference``: the uninterrupted tiny GNTS job (``_job_runs.TINY``), one process
or two ranks under torchrun. Several files compare a disturbed run (killed, moved
between world sizes, run on two nodes) with exactly this run; it is deterministic, so
one run per session serves them all instead of one per test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _job_runs import GNTS, TIMEOUT, TINY, kill_tree, launch_to_files, run_args, sets

REFERENCE_KINDS = ("single", "ddp", "fsdp")
"""``single``: one process, the config's own strategy; ``ddp`` / ``fsdp``: two ranks."""


class ReferenceRun:
    """One reference run, started in the background; :meth:`done` waits for it."""

    def __init__(self, run: Path, proc: subprocess.Popen[str]) -> None:
        self.run = run
        self.proc = proc
        self.output: str | None = None

    def done(self) -> Path:
        """The run's folder (``logs/``, ``ckpt/``) once it has exited 0."""
        if self.output is None:
            try:
                code = self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
                code = None
            output = (self.run / "out.txt").read_text() + (self.run / "err.txt").read_text()
            assert code == 0, f"{self.proc.args} exited {code}\n{output[-4000:]}"
            self.output = output
        return self.run


@pytest.fixture(scope="session")
def tiny_reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], ReferenceRun]]:
    """``tiny_reference(kind)`` starts the reference run of ``kind`` (one of
    :data:`REFERENCE_KINDS`) the first time it is asked for, so it runs beside the
    asking test's own runs, and returns it; read it only after ``.done()``."""
    root = tmp_path_factory.mktemp("reference")
    started: dict[str, ReferenceRun] = {}

    def start(kind: str) -> ReferenceRun:
        assert kind in REFERENCE_KINDS, kind
        if kind not in started:
            run = root / f"tiny_{kind}"
            strategy = [] if kind == "single" else [f"distributed.strategy={kind}"]
            argv = ["train", GNTS, *sets([*TINY, *strategy]), *run_args(run)]
            torchrun = None if kind == "single" else ["--nproc-per-node", "2"]
            started[kind] = ReferenceRun(run, launch_to_files(run, argv, torchrun=torchrun))
        return started[kind]

    yield start
    for reference in started.values():
        if reference.proc.poll() is None:
            kill_tree(reference.proc.pid)
            reference.proc.wait()
