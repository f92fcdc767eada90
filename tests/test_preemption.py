"""Preemption (docs/operations.md): real SIGTERM and SIGUSR1 to real processes.

Invariants:
- a signal to the job, to ``torchrun`` (which forwards it) or to the SLURM batch script
  (which forwards SLURM's SIGUSR1 warning): every rank finishes its optimizer step, the
  ranks agree on one step N, a checkpoint of step N (every rank's part) is written, and
  the job exits non-zero printing ``preempted at step N``, without torchrun having to
  SIGKILL a worker;
- the same command resumes from step N, and the finished run equals an uninterrupted
  one: every step's scheduled values, micro-steps, clock, control metrics and losses,
  and the parameters (bitwise in one process; within 1e-6 relative under torchrun);
- the batch script requeues the job it forwarded the warning to, and only that one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _job_runs import (
    GNTS,
    TINY,
    final_params,
    finish,
    launch,
    max_relative_difference,
    ok,
    records,
    run_args,
    sets,
    wait_for_step,
)

from schedany.job.checkpoint import list_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
CONFIG = [
    *TINY,
    f"train.steps={STEPS}",
    f"schedules.gradient_norm_threshold.num_training_steps={STEPS}",
    "train.checkpoint_every=0",  # so the preemption writes the only checkpoint before the end
]
TORCHRUN = ["--nproc-per-node", "2"]


def argv(run: Path, *more: str) -> list[str]:
    return ["train", GNTS, *sets([*CONFIG, *more]), *run_args(run)]


def preempted(
    proc: subprocess.Popen[str], run: Path, sig: int, *, world: int, exit_code: int
) -> tuple[int, str]:
    """Send ``sig`` once step 2 is logged; check the exit and the checkpoint; return the
    step it stopped at and the output."""
    wait_for_step(run, 2, proc)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    found = re.findall(
        r"^preempted at step (\d+) \(checkpoint (\S+); run the same command", out, re.M
    )
    assert len(found) == 1, f"exit {code}\n{out}\n{err[-4000:]}"  # printed once, by rank 0
    step = int(found[0][0])
    assert code == exit_code and 3 <= step < STEPS, (code, step)
    assert "forcefully exiting" not in err  # torchrun's words when a worker outlives its grace
    (ref,) = list_checkpoints(run / "ckpt")
    assert ref.step == step and str(ref.path) == found[0][1]
    verify_checkpoint(ref)
    assert sorted(p.name for p in ref.path.glob("rank_*.pt")) == [
        f"rank_{r:05d}.pt" for r in range(world)
    ]
    assert [r["step"] for r in records(run)] == list(range(1, step + 1))
    return step, out + err


def assert_equal_runs(reference: Path, resumed: Path, tmp: Path, *, exact: bool) -> None:
    a, b = records(reference), records(resumed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in ("schedule", "micro_steps", "clock"):
            assert x[key] == y[key], (x["step"], key)
        for key in set(x) - {"step", "schedule", "micro_steps", "clock"}:
            assert x[key] == (y[key] if exact else pytest.approx(y[key], rel=1e-6)), key
    assert {r["micro_steps"] for r in a} != {1}, "GNTS never accumulated"
    difference = max_relative_difference(
        final_params(reference, tmp, STEPS), final_params(resumed, tmp, STEPS)
    )
    assert difference == 0.0 if exact else difference <= 1e-6


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_its_step_and_resumes_equal(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "preempted"
    ref = launch(argv(reference))
    step, _ = preempted(launch(argv(run)), run, signal.SIGTERM, world=1, exit_code=143)
    ok(ref)
    resumed = ok(launch(argv(run)))
    assert f"resumed from {run / 'ckpt' / f'step_{step:08d}'} at step {step}" in resumed
    assert_equal_runs(reference, run, tmp_path, exact=True)


@pytest.mark.slow
def test_sigterm_to_torchrun_ddp(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "preempted"
    ddp = "distributed.strategy=ddp"
    ref = launch(argv(reference, ddp), torchrun=TORCHRUN)
    proc = launch(argv(run, ddp), torchrun=TORCHRUN)
    # torchrun itself exits 1 (it raises on the signal); its workers exit 143.
    step, output = preempted(proc, run, signal.SIGTERM, world=2, exit_code=1)
    assert "Received 15 death signal, shutting down workers" in output  # torchrun forwarded
    ok(ref)
    assert f"at step {step}" in ok(launch(argv(run, ddp), torchrun=TORCHRUN))
    assert_equal_runs(reference, run, tmp_path, exact=False)


def _stand_ins(folder: Path) -> Path:
    """``srun`` that runs its command in place (one node), ``scontrol`` that names this
    host and records every other call."""
    folder.mkdir()
    scripts = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": 'if [[ "$1" == show ]]; then echo 127.0.0.1\n'
        'else echo "$*" >> "$SCONTROL_LOG"; fi\n',
    }
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_warning_usr1_through_the_batch_script_fsdp_then_requeue(tmp_path):
    """The SIGUSR1 that ``--signal=B:USR1@...`` sends the batch script goes to srun, to
    the launcher's torchrun (which forwards SIGUSR1 as launch.sh asks) and to both FSDP2
    workers; the script then requeues the job, and the requeued job resumes equal."""
    reference, run = tmp_path / "reference", tmp_path / "preempted"
    fsdp = "distributed.strategy=fsdp"
    ref = launch(argv(reference, fsdp), torchrun=TORCHRUN)
    bin_dir = _stand_ins(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_JOB_NUM_NODES": "1",
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": "0",
        "SCHEDANY_HOME": str(ROOT),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }

    def batch_job() -> subprocess.Popen[str]:
        script = str(ROOT / "distributed" / "slurm.sbatch")
        return subprocess.Popen(
            ["bash", script, *argv(run, fsdp)[1:]],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "RDZV_PORT": str(_free_port())},
        )

    step, output = preempted(batch_job(), run, signal.SIGUSR1, world=2, exit_code=1)
    assert "SIGUSR1 from SLURM: checkpointing, then requeueing job 4242" in output
    assert "Received 10 death signal, shutting down workers" in output  # torchrun forwarded
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    ok(ref)
    resumed = ok(batch_job())  # the requeued job runs the same command
    assert f"at step {step}" in resumed
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # finished: no requeue
    assert_equal_runs(reference, run, tmp_path, exact=False)
