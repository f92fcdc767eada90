"""``schedany control`` against real background runs, and ``schedany train --from``.

Invariants:
- an edit applies at one optimizer-step boundary: ``set`` puts the edited curve at the
  current clock, ``cooldown`` goes on from the value before it (no jump) to V over N
  units of the key's unit, then stays; ``stop`` checkpoints and exits 0;
- every applied edit is in edits.jsonl, the checkpoint and TensorBoard; a run resumed
  from any checkpoint of an edited run equals it (values at every step, parameters);
- under torchrun both ranks apply each edit at the same step, resolved alike;
- a bad edit exits 2 naming the path and queues nothing; nothing listening exits 1;
  a malformed file in the queue is refused in the run's log, and the run goes on;
- branches ``--from`` one checkpoint start from the same state, on their own curves.
Files are polled with deadlines; nothing waits a fixed time.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from _job_runs import GNTS, TIMEOUT, TINY, kill_tree, records, run_args, sets

from schedany import curves
from schedany.cli import main
from schedany.job._channel import read_jsonl
from schedany.job._safe_load import load_plain
from schedany.job.control import control_command, make_request

LR, WD = 3e-3, 0.1  # gnts.yaml's optimizer values
LONG = [*TINY, "train.steps=1000000", "train.checkpoint_every=4", "train.keep_checkpoints=1000"]
LONG += ["schedules.weight_decay.unit=tokens", "schedules.weight_decay.num_warmup_steps=500"]
LONG += ["schedules.weight_decay.num_training_steps=10000000"]  # runs end with `control stop`
WD_CURVE = curves.cosine_annealing_with_warmup(1.0, 0.1, 500, 10_000_000)


def start(run: Path, *more: str, torchrun: int = 0) -> subprocess.Popen[str]:
    """A background ``schedany train``; its output goes to files (a pipe could fill)."""
    run.mkdir(parents=True, exist_ok=True)
    prefix = [sys.executable]
    if torchrun:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    argv = [*prefix, "-m", "schedany", "train", GNTS, *sets(LONG), *run_args(run), *more]
    return subprocess.Popen(
        argv,
        text=True,
        stdout=open(run / "out.txt", "w"),  # noqa: SIM115 - the child owns it
        stderr=open(run / "err.txt", "w"),  # noqa: SIM115
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for(what: str, predicate, proc=None, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            if proc is not None:
                kill_tree(proc.pid)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def control(*argv: str) -> tuple[int, str]:
    """``schedany control ...`` in this process: (exit code, stdout + stderr)."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(["control", *argv])
    return code, out.getvalue()


def step_of(run: Path) -> int:
    try:
        return json.loads((run / "logs" / "control" / "status.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def applied(run: Path) -> list[dict]:
    return read_jsonl(run / "logs" / "edits.jsonl")


def send(run: Path, proc, *argv: str) -> dict:
    """Queue one edit and wait until the run has applied it; its record."""
    before = len(applied(run))
    code, out = control(str(run / "logs"), *argv)
    assert code == 0, out
    return wait_for(f"{argv} to apply", lambda: applied(run)[before:], proc)[0]


def exit_code(proc, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail("the run did not exit")


def params(run: Path, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run.name}-{step}.pt"
    dcp_to_torch_save(run / "ckpt" / f"step_{step:08d}", out)
    return torch.load(out, weights_only=True)["model"]


def plain(path: Path) -> dict:
    return load_plain(path.read_bytes(), str(path))


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """One background run steered through every command, then stopped."""
    root = tmp_path_factory.mktemp("live")
    run, logs = root / "a", str(root / "a" / "logs")
    proc = start(run)
    wait_for("step 6", lambda: step_of(run) >= 6, proc)
    e = {"set": send(run, proc, "set", "schedules.lr.warmup_to_value=0.5")}
    wait_for("a checkpoint after the set", lambda: step_of(run) >= e["set"]["step"] + 6, proc)

    queue = run / "logs" / "control" / "queue"
    listing = sorted(os.listdir(queue))
    bad = {  # (more in test_live_edits.py)
        "schedules.lr.num_warmup_steps": ["set", "schedules.lr.num_warmup_steps=-5"],
        "--to": ["cooldown", "lr", "--over", "5"],  # constant_with_warmup has no end value
    }
    e["bad"] = {path: control(logs, *argv) for path, argv in bad.items()}
    assert sorted(os.listdir(queue)) == listing  # nothing queued
    # Dropped in by hand: a torn request, and a link to a good one outside the run.
    (queue / "000101.json").write_text('{"format": "schedany-edit/1", "command": "se')
    outside = root / "outside.json"
    outside.write_text('{"format": "schedany-edit/1", "command": "stop"}')
    (queue / "000102.json").symlink_to(outside)
    refused = run / "logs" / "control" / "refused.jsonl"
    wait_for("two refusals", lambda: len(read_jsonl(refused)) == 2, proc)

    e["wd"] = send(run, proc, "cooldown", "weight_decay", "--over", "3000", "--shape", "cosine")
    wait_for("a checkpoint after the cooldown", lambda: step_of(run) >= e["wd"]["step"] + 6, proc)
    before = len(applied(run))
    both = [  # two commands at once (the queue's race itself: test_live_edits.py)
        make_request("set", sets=["schedules.gradient_norm_threshold.anneal_to_value=0.5"]),
        make_request("cooldown", target="lr", over=10, to=1e-5),
    ]
    names: list[str] = []
    threads = [
        threading.Thread(target=lambda r=r: names.append(control_command(logs, r))) for r in both
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 2
    e["pair"] = wait_for(
        "both to apply", lambda: applied(run)[before:][1:] and applied(run)[before:], proc
    )
    last = max(r["step"] for r in e["pair"])
    wait_for("the lr cooldown to end", lambda: step_of(run) >= last + 13, proc)
    e["status"] = control(logs, "status")
    e["status_json"] = json.loads(control(logs, "status", "--json")[1])
    e["stop"] = send(run, proc, "stop")
    assert exit_code(proc) == 0, (run / "err.txt").read_text()[-3000:]
    e["after_stop"] = {
        what: control(logs, *argv)
        for what, argv in {"status": ["status"], "set": ["set", "train.steps=10"]}.items()
    }
    return root, run, e


@pytest.mark.slow
def test_edits_apply_continuously_and_are_recorded(edited):
    root, run, e = edited
    steps = records(run)
    value = {r["step"]: r["schedule"] for r in steps}
    tokens = {r["step"]: r["clock"]["tokens"] for r in steps}
    k1, k2, k_end = e["set"]["step"], e["wd"]["step"], e["stop"]["step"]
    cd_lr = next(r for r in e["pair"] if r["command"] == "cooldown")
    k4 = cd_lr["step"]
    # set: the edited curve, at the current clock, from the next step on
    for s in range(1, k4 + 1):
        w = 1.0 if s <= k1 else 0.5
        expected = LR * curves.constant_with_warmup(w, 10)(s - 1)
        assert value[s]["lr"] == [pytest.approx(expected, rel=1e-12)] * 2, s
    # cooldown in tokens, default end = anneal_to_value x base; no_decay's base 0 stays 0
    start, v0 = e["wd"]["clock"]["tokens"], WD * WD_CURVE(e["wd"]["clock"]["tokens"])
    assert e["wd"]["cooldown"]["start_values"] == [pytest.approx(v0, rel=1e-12), 0.0]
    assert e["wd"]["cooldown"]["end_values"] == [pytest.approx(WD * 0.1, rel=1e-12), 0.0]
    # continuous: the first value after the edit is the one the old schedule had next
    assert value[k2 + 1]["weight_decay"][0] == pytest.approx(WD * WD_CURVE(tokens[k2]), rel=1e-12)
    reached = False
    for s in range(k2 + 1, k_end + 1):
        p = min(1.0, (tokens[s - 1] - start) / 3000)
        expected = WD * 0.1 + (v0 - WD * 0.1) * 0.5 * (1 + math.cos(math.pi * p))
        assert value[s]["weight_decay"] == [pytest.approx(expected, rel=1e-9, abs=1e-15), 0.0]
        reached = reached or p == 1.0
    assert reached, "the run stopped before the weight-decay cooldown ended"
    # the lr cooldown, in steps: from the value it had, to exactly 1e-5 after 10 steps
    lr0 = LR * curves.constant_with_warmup(0.5, 10)(k4)
    assert cd_lr["cooldown"]["start_values"] == [pytest.approx(lr0, rel=1e-12)] * 2
    for s in range(k4 + 1, k_end + 1):
        p = min(1.0, (s - 1 - k4) / 10)
        assert value[s]["lr"][0] == pytest.approx(1e-5 + (lr0 - 1e-5) * (1 - p), rel=1e-12)
    assert value[k_end]["lr"] == [pytest.approx(1e-5, rel=1e-12)] * 2
    # both commands sent at once applied, in the order of their queue numbers
    assert [r["seq"] for r in e["pair"]] == sorted(r["seq"] for r in e["pair"])
    k3 = next(r for r in e["pair"] if r["command"] == "set")["step"]
    assert value[k3 + 1]["gradient_norm_threshold"] == [pytest.approx(0.5, rel=1e-12)] * 2
    # recorded: edits.jsonl, the stop checkpoint, TensorBoard
    journal = applied(run)
    commands = [r["command"] for r in journal]
    assert commands[:2] == ["set", "cooldown"] and commands[-1] == "stop"
    assert sorted(commands[2:4]) == ["cooldown", "set"] and len(journal) == 5
    assert all({"seq", "step", "clock", "time"} <= r.keys() for r in journal)
    state = plain(run / "ckpt" / f"step_{k_end:08d}" / "state.pt")
    assert state["state"]["edits"] == journal
    from tensorboard.backend.event_processing.event_accumulator import (
        TENSORS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(run / "logs"), size_guidance={TENSORS: 0})
    acc.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("control/edits")]
    assert [json.loads(t.splitlines()[-1]) for t in texts] == journal
    assert [t.step for t in acc.Tensors("control/edits")] == [r["step"] for r in journal]


@pytest.mark.slow
def test_status_bad_edits_and_no_listener(edited):
    root, run, e = edited
    code, out = e["status"]
    assert code == 0, out
    assert "listening (pid" in out and "step " in out and "clock      steps" in out
    for key in ("lr", "weight_decay", "gradient_norm_threshold"):
        assert f"  {key} " in out and "decay " in out and "no_decay " in out
    assert "pending edits: none" in out and "set schedules.lr.warmup_to_value=0.5" in out
    info = e["status_json"]
    assert set(info["status"]["schedules"]["lr"]) == {"decay", "no_decay"}
    assert info["status"]["clock"]["tokens"] > 0 and info["listening"]
    for path, (code, out) in e["bad"].items():
        assert code == 2 and f"schedany control: error: {path}: " in out, out
    assert [r["seq"] for r in info["refused"]] == [101, 102]
    err = (run / "err.txt").read_text()
    assert "refused 000101.json: not a complete JSON request" in err
    assert "refused 000102.json: cannot open it" in err and "Traceback" not in err
    for code, out in e["after_stop"].values():
        assert code == 1 and "no run listens in" in out, out
    assert "state      stopped" in e["after_stop"]["status"][1]
    assert control(str(root / "never"), "stop")[0] == 1
    logs = run / "logs"
    private = [logs / "edits.jsonl", logs / "config.yaml", *(logs / "control").glob("*.json*")]
    private += list((logs / "control" / "queue").glob("*.done"))
    assert {p.stat().st_mode & 0o777 for p in private} == {0o600}, private
    folders = [logs / "control", logs / "control" / "queue"]
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o700}


@pytest.mark.slow
def test_resumed_runs_equal_the_edited_run(edited, tmp_path):
    """Resumed from a checkpoint before the first edit, between two, and after all of
    them (a crash after the stop would leave these): each re-applies the journal's edits
    at their steps and ends equal to the uninterrupted run."""
    root, run, e = edited
    k1, k2, k_end = e["set"]["step"], e["wd"]["step"], e["stop"]["step"]
    saved = sorted(int(p.name[5:]) for p in (run / "ckpt").glob("step_*"))
    points = [
        max(s for s in saved if s < k1),
        max(s for s in saved if k1 <= s < k2),
        max(s for s in saved if s < k_end),
    ]
    procs = {}
    for c in points:
        again = tmp_path / f"from{c}"
        shutil.copytree(run / "logs", again / "logs")
        shutil.copytree(run / "ckpt" / f"step_{c:08d}", again / "ckpt" / f"step_{c:08d}")
        procs[c] = (again, start(again))
    for c, (again, proc) in procs.items():
        assert exit_code(proc) == 0, (again / "err.txt").read_text()[-3000:]
        assert f"at step {c}" in (again / "out.txt").read_text()
        assert records(again) == records(run)  # every value, control metric and loss
        assert applied(again) == applied(run)
        a, b = params(run, k_end, tmp_path), params(again, k_end, tmp_path)
        for key in a:
            scale = a[key].abs().max().clamp_min(1e-12)
            assert ((a[key] - b[key]).abs().max() / scale).item() <= 1e-6, key
    # and the same command resumes the stopped run, its edits in force; it then runs to
    # a budget set live, and resumed once more it keeps that budget: nothing is left.
    proc = start(run)
    wait_for("steps after the stop", lambda: step_of(run) >= k_end + 3, proc)
    budget = step_of(run) + 40
    send(run, proc, "set", f"train.steps={budget}")
    assert exit_code(proc) == 0
    assert f"resumed from {run / 'ckpt' / f'step_{k_end:08d}'}" in (run / "out.txt").read_text()
    after = [r for r in records(run) if r["step"] > k_end]
    assert after and all(r["schedule"]["lr"] == [pytest.approx(1e-5)] * 2 for r in after)
    done = records(run)
    assert done[-1]["step"] == budget
    assert exit_code(start(run)) == 0
    assert f"resumed from {run / 'ckpt' / f'step_{budget:08d}'}" in (run / "out.txt").read_text()
    assert records(run) == done


@pytest.mark.slow
def test_torchrun_ranks_apply_each_edit_at_the_same_step(tmp_path):
    run = tmp_path / "ddp"
    proc = start(run, *sets(["distributed.strategy=ddp"]), torchrun=2)
    wait_for("step 3", lambda: step_of(run) >= 3, proc)
    cd = send(run, proc, "cooldown", "lr", "--over", "6", "--to", "1e-5")
    send(run, proc, "set", "schedules.gradient_norm_threshold.anneal_to_value=0.5")
    wait_for(
        "the status to show the edit",
        lambda: "gradient_norm_threshold  decay 0.5" in control(str(run / "logs"), "status")[1],
        proc,
    )
    stop = send(run, proc, "stop")
    assert exit_code(proc) == 0, (run / "err.txt").read_text()[-3000:]
    folder = run / "ckpt" / f"step_{stop['step']:08d}"
    per_rank = [plain(folder / f"rank_{r:05d}.pt")["edits"] for r in (0, 1)]
    assert per_rank[0] == per_rank[1] == plain(folder / "state.pt")["state"]["edits"]
    assert per_rank[1] == applied(run) and [r["command"] for r in per_rank[1]][-1] == "stop"
    value = {r["step"]: r["schedule"]["lr"][0] for r in records(run)}
    v0 = cd["cooldown"]["start_values"][0]
    for s in range(cd["step"] + 1, stop["step"] + 1):
        p = min(1.0, (s - 1 - cd["step"]) / 6)
        assert value[s] == pytest.approx(1e-5 + (v0 - 1e-5) * (1 - p), rel=1e-12)


@pytest.mark.slow
def test_branches_from_one_checkpoint(tmp_path):
    """A source run and three branches from its step-4 checkpoint: one on the source's
    own config (it equals the source), two cooldowns on their own curves."""
    short = [*TINY, "train.log_every=1", "train.keep_checkpoints=10"]
    short += ["schedules.lr.num_warmup_steps=2"]
    src = tmp_path / "src"
    argv = ["train", GNTS, *sets(short)]
    subprocess.run(
        [sys.executable, "-m", "schedany", *argv, *run_args(src)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    source_files = sorted(str(p) for p in (src / "ckpt").rglob("*"))
    origin = str(src / "ckpt" / "step_00000004")
    wsd = "{curve: warmup_stable_decay, warmup_to_value: 1.0, anneal_to_value: %s, "
    wsd += "num_warmup_steps: 0, num_training_steps: 8, num_decay_steps: 4, decay_shape: %s}"
    branches = {
        "same": [],
        "linear": ["--set", "schedules.lr=" + wsd % (0.0, "linear")],
        "cosine": ["--set", "schedules.lr=" + wsd % (0.1, "cosine")],
    }
    commands = {
        n: [*argv, *run_args(tmp_path / n), "--from", origin, *b] for n, b in branches.items()
    }
    procs = {
        n: subprocess.Popen(
            [sys.executable, "-m", "schedany", *c],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for n, c in commands.items()
    }
    for proc in procs.values():
        out = proc.communicate(timeout=TIMEOUT)[0]
        assert proc.returncode == 0, out
        assert f"resumed from {origin} at step 4" in out
    assert sorted(str(p) for p in (src / "ckpt").rglob("*")) == source_files
    source = records(src)
    assert records(tmp_path / "same") == source[4:]
    a, b = params(src, 8, tmp_path), params(tmp_path / "same", 8, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name, (end, shape) in {"linear": (0.0, "linear"), "cosine": (0.1, "cosine")}.items():
        got = records(tmp_path / name)
        assert [r["step"] for r in got] == [5, 6, 7, 8]
        assert got[0]["train/loss"] == source[4]["train/loss"]  # the same model, the same data
        curve = curves.warmup_stable_decay(1.0, end, 0, 8, 4, shape)
        for r in got:
            assert r["schedule"]["lr"] == [pytest.approx(LR * curve(r["step"] - 1), rel=1e-12)] * 2
        assert got[1]["schedule"]["lr"] != source[5]["schedule"]["lr"]
    again = subprocess.run(
        [sys.executable, "-m", "schedany", *commands["linear"]],
        text=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert again.returncode == 0
    assert f"resumed from {tmp_path / 'linear' / 'ckpt' / 'step_00000008'}" in again.stdout
    out = io.StringIO()
    with redirect_stderr(out):
        code = main([*argv, *run_args(tmp_path / "nowhere"), "--from", str(tmp_path / "none")])
    assert code == 2 and "--from: " in out.getvalue()
