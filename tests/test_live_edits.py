"""Live-control pieces in one process: the cooldown curve, the queue, how an edit is
checked against a run's config, and the client against a listener of its own.

Invariants:
- a cooldown starts at the value it was given, follows V + (v0 - V) * shape(p) in its
  unit, reaches V after N units and stays; a group whose base is 0 stays 0;
- clients queuing at once get distinct, consecutive numbers and whole 0600 files;
- a bad edit names its path (as ``--set`` does) and is never queued;
- an edit is checked against the config as the queued edits before it will leave it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from _job_runs import GNTS, TINY, sets

from schedany import Clock, SynchronousSchedule
from schedany.config import ConfigError, config_to_dict, load_config
from schedany.job import _channel as channel
from schedany.job.control import NotListening, control_command, format_status, make_request
from schedany.job.control import status as run_status
from schedany.job.edits import Request, check_request, effective_config, parse_request
from schedany.job.rebuild import Cooldown, advance


def test_cooldown_follows_its_shape_in_its_unit_and_stays() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD(
        [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    )
    cooldown = Cooldown("weight_decay", "tokens", 1000, 300, "sqrt", (0.08, 0.0), (0.01, 0.0))
    clock = Clock()
    clock.load_state_dict({"steps": 10, "samples": 80, "tokens": 1000})
    schedule = SynchronousSchedule([cooldown.member(opt, [0.1, 0.0])], clock=clock)
    advance(schedule, 10)
    assert schedule.get_last_schedule("weight_decay") == [pytest.approx(0.08, rel=1e-15), 0.0]
    for _ in range(8):
        opt.step()
        clock.advance(samples=8, tokens=70)
        schedule.step()
        p = min(1.0, (clock.tokens - 1000) / 300)
        expected = 0.01 + (0.08 - 0.01) * (1 - math.sqrt(p))
        assert schedule.get_last_schedule("weight_decay") == [
            pytest.approx(expected, rel=1e-12),
            0.0,
        ]
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01, rel=1e-12)  # 1560 > 1300
    assert Cooldown.from_dict(json.loads(json.dumps(cooldown.to_dict()))) == cooldown


def test_clients_queuing_at_once_get_distinct_consecutive_numbers(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    channel.make_private_dir(queue)
    names: list[str] = []

    def client(i: int) -> None:
        for j in range(5):
            names.append(channel.enqueue(queue, {"client": i, "n": j}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == [f"{n:06d}.json" for n in range(1, 41)]
    bodies = [json.loads((queue / name).read_text()) for name in names]
    assert sorted((b["client"], b["n"]) for b in bodies) == [
        (i, j) for i in range(8) for j in range(5)
    ]
    assert {(queue / name).stat().st_mode & 0o777 for name in names} == {0o600}
    assert sorted(os.listdir(queue)) == sorted(names)  # no temporary file left
    assert queue.stat().st_mode & 0o777 == 0o700


@pytest.fixture
def config_data() -> dict:
    return config_to_dict(load_config(GNTS, TINY))


def edit(*words: str) -> Request:
    if words[0] == "set":
        return make_request("set", sets=words[1:])
    if words[0] == "stop":
        return make_request("stop")
    to = float(words[4]) if len(words) > 4 else None
    return make_request("cooldown", target=words[1], over=int(words[2]), to=to, shape=words[3])


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["set", "optimizer.lr=1.0"], "optimizer.lr: live control may only change"),
        (["set", "train.log_dir=/etc"], "train.log_dir: live control may only change"),
        (["set", "schedules.lr.num_warmup_steps=-5"], "schedules.lr.num_warmup_steps: expected"),
        (["set", "schedules.lr.bogus=1"], "schedules.lr.bogus: unknown argument"),
        (["set", "train.steps=0"], "train.steps: expected an integer >= 1, got 0"),
        (["set", "train.tokens=100"], "train.tokens: expected exactly one budget"),
        (
            ["set", "schedules.momentum={curve: constant_schedule, value: 1.0}"],
            "schedules.momentum",
        ),
        (["set", "=5"], "--set =5: expected KEY=VALUE"),
        (["cooldown", "nope", "5", "linear"], "schedules.nope: not scheduled in this run"),
        (["cooldown", "weight_decay", "0", "linear"], "--over: expected an integer >= 1"),
        (["cooldown", "lr", "5", "linear"], "--to: required: schedules.lr is curve constant_with"),
        (["cooldown", "lr", "5", "linear", "nan"], "--to: expected a finite number"),
        (["cooldown", "weight_decay", "5", "cubic"], "--shape: expected one of linear"),
    ],
)
def test_bad_edits_name_the_path(config_data: dict, words: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_request(edit(*words), config_data)
    assert str(info.value).startswith(message), str(info.value)


def test_requests_from_files_are_strict(config_data: dict) -> None:
    for data, message in [
        ({}, "expected a JSON object with format"),
        ({"format": "schedany-edit/1", "command": "rm"}, "command: expected one of set"),
        ({"format": "schedany-edit/1", "command": "stop", "path": "/etc"}, "path: unknown"),
        ({"format": "schedany-edit/1", "command": "set", "set": "lr=1"}, "set: expected 1 to"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_request(data)
    no_checkpoints = {**config_data, "train": {**config_data["train"], "checkpoint_dir": None}}
    with pytest.raises(ConfigError, match="train.checkpoint_dir: is null"):
        check_request(edit("stop"), no_checkpoints)
    new, config = check_request(
        edit("set", "schedules.weight_decay.anneal_to_value=0.0"), config_data
    )
    assert config.schedules["weight_decay"].args["anneal_to_value"] == 0.0
    assert new["schedules"]["weight_decay"]["anneal_to_value"] == 0.0
    assert config_data["schedules"]["weight_decay"]["anneal_to_value"] == 0.1  # not changed


def test_a_set_of_a_key_ends_its_cooldown(config_data: dict) -> None:
    cooldown = Cooldown("lr", "steps", 5, 10, "linear", (1.0, 1.0), (0.1, 0.1)).to_dict()
    records = [
        {"command": "cooldown", "target": "lr", "cooldown": cooldown},
        {"command": "set", "set": ["train.steps=50"]},
    ]
    data, cooldowns = effective_config(config_data, records)
    assert list(cooldowns) == ["lr"] and data["train"]["steps"] == 50
    records.append({"command": "set", "set": ["schedules.lr.warmup_to_value=0.5"]})
    data, cooldowns = effective_config(config_data, records)
    assert cooldowns == {} and data["schedules"]["lr"]["warmup_to_value"] == 0.5


def fake_run(tmp_path: Path, config_data: dict, pid: int) -> Path:
    """A run folder as a listening job leaves it, the listener being ``pid``."""
    run = tmp_path / "run"
    run.mkdir()
    channel.make_private_dir(run / "control")
    channel.make_private_dir(run / "control" / "queue")
    (run / "config.yaml").write_text(yaml.safe_dump(config_data))
    listener = {**channel.this_listener(), "pid": pid}
    (run / "control" / "listener.json").write_text(json.dumps(listener))
    return run


def test_an_edit_is_checked_after_the_queued_ones(tmp_path: Path, config_data: dict) -> None:
    run = fake_run(tmp_path, config_data, os.getpid())  # this process listens
    name = control_command(str(run), edit("set", "schedules.weight_decay.num_warmup_steps=70"))
    assert name == "000001.json"
    # Valid against config.yaml (warmup 10), not after the queued edit (warmup 70):
    with pytest.raises(ConfigError, match="schedules.weight_decay.num_training_steps"):
        control_command(str(run), edit("set", "schedules.weight_decay.num_training_steps=60"))
    info = run_status(str(run))
    assert info["listening"] and [e["seq"] for e in info["pending"]] == [1]
    lines = format_status(info)
    assert "  000001  set schedules.weight_decay.num_warmup_steps=70" in lines
    assert sorted(os.listdir(run / "control" / "queue")) == ["000001.json"]
    assert parse_request(channel.read_request(run / "control" / "queue" / name)).set == (
        "schedules.weight_decay.num_warmup_steps=70",
    )


def test_a_gone_listener_is_not_listening(tmp_path: Path, config_data: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    run = fake_run(tmp_path, config_data, int(done.stdout))
    with pytest.raises(NotListening, match=r"\(pid \d+\) is gone"):
        control_command(str(run), edit("stop"))
    assert os.listdir(run / "control" / "queue") == []


def test_a_second_run_in_a_live_runs_log_dir_is_refused_and_changes_nothing(
    tmp_path: Path, config_data: dict
) -> None:
    """Refused before it opens a file there: the live run's metrics and config stay."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = fake_run(tmp_path, config_data, other.pid)
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        done = subprocess.run(
            [sys.executable, "-m", "schedany", "train", GNTS, *sets(TINY)]
            + sets([f"train.log_dir={run}", "train.checkpoint_dir=null"]),
            text=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        other.kill()
        other.wait()
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"another run (pid {other.pid}" in done.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
