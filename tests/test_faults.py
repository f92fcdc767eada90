"""Faults inside a checkpoint write, and a rank that stops responding (docs/operations.md).

Invariants:
- a process SIGKILLed half-way through writing a checkpoint leaves the previous one
  valid; the same command resumes from it and ends equal to an uninterrupted run;
- a full disk (ENOSPC inside the write) ends the run with exit 1 and one clear line, on
  every rank (one rank's failure is agreed on, none waits for it), the partial folder
  removed and the previous checkpoint intact;
- a rank that stops responding makes the others fail within the process-group timeout
  (``distributed.timeout_minutes``) with a message naming the last completed step.
The faults are real (``schedany.job._faults``): SIGKILL, an ``OSError(ENOSPC)`` raised in
the middle of the file being written, a rank asleep outside every collective.
"""

from __future__ import annotations

import re

import pytest
from _job_runs import (
    GNTS,
    TINY,
    final_params,
    finish,
    launch,
    ok,
    records,
    run_args,
    sets,
)

from schedany.cli import main
from schedany.job.checkpoint import CheckpointRef, list_checkpoints, verify_checkpoint


def fault(run, step: int, kind: str, rank: int = 0) -> dict[str, str]:
    return {
        "SCHEDANY_FAULT_AT_STEP": str(step),
        "SCHEDANY_FAULT_RANK": str(rank),
        "SCHEDANY_FAULT_KIND": kind,
        "SCHEDANY_FAULT_MARKER": str(run / "fault.marker"),
    }


def argv(run, *more: str) -> list[str]:
    return ["train", GNTS, *sets([*TINY, *more]), *run_args(run)]


def only_step_2_left(run) -> None:
    assert [ref.step for ref in list_checkpoints(run / "ckpt")] == [2]
    verify_checkpoint(CheckpointRef(2, run / "ckpt" / "step_00000002"))


@pytest.mark.slow
def test_killed_in_the_middle_of_a_checkpoint_write_resumes_from_the_previous(
    tmp_path, tiny_reference
):
    # The uninterrupted run: the session's shared one-process run of `TINY` (conftest.py).
    ref, run = tiny_reference("single"), tmp_path / "killed"
    code, out, err = finish(launch(argv(run), fault(run, 4, "kill_in_write")))
    assert code == -9, f"the fault did not fire: exit {code}\n{out}\n{err}"
    partial = run / "ckpt" / ".tmp.step_00000004"
    assert list(partial.glob("*.distcp")) and list(partial.glob(".tmp.rank_00000.pt.*"))
    assert not (partial / "MANIFEST.json").exists()
    only_step_2_left(run)

    output = ok(launch(argv(run), fault(run, 4, "kill_in_write")))  # the marker disarms it
    assert f"resumed from {run / 'ckpt' / 'step_00000002'} at step 2" in output
    assert not partial.exists()  # the next checkpoint cleans it up
    reference = ref.done()
    assert records(run) == records(reference)
    a, b = final_params(reference, tmp_path), final_params(run, tmp_path)
    assert all((a[k] == b[k]).all() for k in a)


def test_full_disk_exits_1_with_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "full"
    for name, value in fault(run, 4, "enospc_in_write").items():
        monkeypatch.setenv(name, value)
    code = main(argv(run, "train.steps=6"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"schedany train: error: checkpoint {run / 'ckpt' / 'step_00000004'} could not be "
        "written ([Errno 28] No space left on device: "
    )
    assert "are intact, so the same command resumes from the newest of them" in err
    assert not list((run / "ckpt").glob(".tmp.*"))  # the partial folder is gone
    only_step_2_left(run)

    assert main(argv(run, "train.steps=6")) == 0  # disarmed: resumes
    assert "resumed from" in capsys.readouterr().out
    assert [ref.step for ref in list_checkpoints(run / "ckpt")] == [6, 4]  # keep_checkpoints: 2


@pytest.mark.slow
def test_full_disk_on_one_rank_fails_both_ranks_cleanly(tmp_path):
    run = tmp_path / "full"
    proc = launch(
        argv(run, "distributed.strategy=ddp"),
        fault(run, 4, "enospc_in_write", rank=1),
        torchrun=["--nproc-per-node", "2"],
    )
    code, out, err = finish(proc)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("schedany train: error:")]
    assert len(lines) == 2, err[-4000:]  # each rank says it once
    assert any("[Errno 28] No space left on device" in line for line in lines)
    assert any("another rank could not write its part" in line for line in lines)
    assert not re.search(r'File ".*/schedany/', err), err[-4000:]  # torchrun's own traceback only
    only_step_2_left(run)


@pytest.mark.slow
def test_a_rank_that_stops_responding_fails_the_job_naming_the_step(tmp_path):
    run = tmp_path / "stalled"
    env = {**fault(run, 2, "stall", rank=1), "SCHEDANY_FAULT_STALL_SECONDS": "10"}
    proc = launch(
        # 0.05 minutes: every collective waits 3 s for its peer.
        argv(run, "distributed.strategy=ddp", "distributed.timeout_minutes=0.05"),
        env,
        torchrun=["--nproc-per-node", "2"],
    )
    code, out, err = finish(proc)
    assert code != 0
    assert "schedany train: error: rank 0 failed after optimizer step 2 (in step 3" in err
    assert "the job waits 3 s for a collective (distributed.timeout_minutes)" in err
    assert [r["step"] for r in records(run)] == [1, 2]
