"""Running the reference job in subprocesses: plain, under torchrun, or through the
multi-node launcher; tiny settings so each run takes seconds; killing a whole
process tree when a run hangs; reading back what a run logged and saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
GNTS = str(EXAMPLES / "gnts.yaml")
STEPS = 8
TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.seq_len=32",
    "data.max_bytes=200000",
    "data.eval_windows=8",
    "data.eval_batch_size=8",
]
"""A model and data small enough that a run takes seconds (any example config)."""
TINY = [
    *TINY_MODEL,
    "train.micro_batch_size=4",
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "train.eval_every=0",
    "train.progress=lines",
    # GNTS reaches its threshold inside the run, so accumulation really varies.
    "schedules.gradient_norm_threshold.num_warmup_steps=2",
    f"schedules.gradient_norm_threshold.num_training_steps={STEPS}",
    "control.max_accumulation_steps=4",
]
TIMEOUT = 180


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_args(run: Path, *more: str) -> list[str]:
    return sets([f"train.log_dir={run / 'logs'}", f"train.checkpoint_dir={run / 'ckpt'}", *more])


def command(argv: list[str], torchrun: list[str] | None = None) -> list[str]:
    """``python -m schedany ARGV``, under ``torchrun --standalone TORCHRUN`` if given."""
    prefix = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *torchrun]
        if torchrun is not None
        else [sys.executable]
    )
    return [*prefix, "-m", "schedany", *argv]


def launch(
    argv: list[str], env: dict[str, str] | None = None, torchrun: list[str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(argv, torchrun),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def launch_to_files(
    run: Path, argv: list[str], torchrun: list[str] | None = None
) -> subprocess.Popen[str]:
    """:func:`launch` with the output in ``run/out.txt`` and ``run/err.txt``: for a run
    read long after it started (a pipe nobody reads could fill and block it)."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "out.txt", "w") as out, open(run / "err.txt", "w") as err:
        return subprocess.Popen(
            command(argv, torchrun),
            text=True,
            stdout=out,
            stderr=err,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun's workers run in sessions of
    their own, so a process-group kill would miss them and they would hold the pipes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out: {proc.args}\n{out}\n{err[-4000:]}")
    return proc.returncode, out, err


def ok(proc: subprocess.Popen[str]) -> str:
    code, out, err = finish(proc)
    assert code == 0, f"{proc.args} exited {code}\n{out}\n{err[-4000:]}"
    return out + err


def fault(run: Path, step: int, rank: int = 0) -> dict[str, str]:
    return {
        "SCHEDANY_FAULT_AT_STEP": str(step),
        "SCHEDANY_FAULT_RANK": str(rank),
        "SCHEDANY_FAULT_MARKER": str(run / "fault.marker"),
    }


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def final_params(run: Path, tmp: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run.name}.pt"
    dcp_to_torch_save(run / "ckpt" / f"step_{steps:08d}", out)
    return torch.load(out, weights_only=True)["model"]


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Over every parameter: max |a - b| / max |a| (the tensor's own scale)."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen[str]) -> None:
    """Until ``metrics.jsonl`` shows optimizer step ``step`` (fails if the run ends first)."""
    path = run / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and len(path.read_text().splitlines()) >= step):
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
        if proc.poll() is not None:
            code, out, err = finish(proc)
            pytest.fail(f"the run ended (exit {code}) before step {step}\n{out}\n{err[-4000:]}")
        time.sleep(0.02)
