"""The reference job end to end, through the real CLI in subprocesses (and torchrun).

Invariants:
- every example config runs and its eval loss falls;
- two identical single-process runs give bitwise-identical parameters;
- a run killed with SIGKILL and resumed from its checkpoint equals an uninterrupted
  run: parameters and every per-step scheduled value (bitwise single-process;
  <= 1e-6 relative under DDP);
- DDP and FSDP2 runs under torchrun complete;
- a corrupt or truncated checkpoint is never loaded: the previous good one is.

The model, corpus and step counts are tiny (``TINY``) so the whole file runs in about
a minute on 2 CPU cores; runs that do not depend on each other run concurrently.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _job_runs import (
    EXAMPLES,
    GNTS,
    STEPS,
    TINY,
    fault,
    final_params,
    finish,
    launch,
    ok,
    records,
    run_args,
    sets,
)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_reference):
    """Three single-process runs of the tiny GNTS job: two uninterrupted ("a" is the
    session's shared reference run, conftest.py), and one killed after step 5 (its last
    checkpoint is step 4), then restarted."""
    root = tmp_path_factory.mktemp("single")
    a = tiny_reference("single")
    runs = {name: root / name for name in ("b", "killed")}
    argv = {name: ["train", GNTS, *sets(TINY), *run_args(run)] for name, run in runs.items()}
    procs = [launch(argv["b"]), launch(argv["killed"], fault(runs["killed"], step=5))]
    ok(procs[0])
    code, out, err = finish(procs[1])
    assert code == -9, f"the fault did not fire: exit {code}\n{out}\n{err}"
    assert (runs["killed"] / "fault.marker").exists()
    assert "resumed from" in ok(launch(argv["killed"], fault(runs["killed"], step=5)))
    runs["a"] = a.done()
    return root, runs


@pytest.mark.slow
def test_examples_run_through_the_cli_and_learn(tmp_path):
    names = ["baseline", "weight_decay", "logical_batch", "gnts"]
    procs = {
        name: launch(
            [
                "train",
                str(EXAMPLES / f"{name}.yaml"),
                *sets(
                    [
                        "train.steps=10",
                        "data.max_bytes=300000",
                        "data.eval_windows=16",
                        f"train.log_dir={tmp_path / name / 'logs'}",
                        f"train.checkpoint_dir={tmp_path / name / 'ckpt'}",
                    ]
                ),
            ]
        )
        for name in names
    }
    for name, proc in procs.items():
        output = ok(proc)
        evals = [r["eval/loss"] for r in records(tmp_path / name) if "eval/loss" in r]
        first = float(output.split("step 0/10  eval/loss ")[1].split()[0])
        assert evals[-1] < first - 0.3, f"{name}: eval loss {first} -> {evals[-1]}"
        assert (tmp_path / name / "ckpt" / "step_00000010" / "MANIFEST.json").exists()
        assert list((tmp_path / name / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_identical_runs_give_bitwise_identical_parameters(single, tmp_path):
    _, runs = single
    a, b = final_params(runs["a"], tmp_path), final_params(runs["b"], tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_single_process(single, tmp_path):
    _, runs = single
    reference, resumed = records(runs["a"]), records(runs["killed"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed == reference  # every scheduled value, control metric and loss
    assert {r["micro_steps"] for r in reference} != {1}, "GNTS never accumulated"
    a, killed = final_params(runs["a"], tmp_path), final_params(runs["killed"], tmp_path)
    assert all(torch.equal(a[k], killed[k]) for k in a)


@pytest.mark.slow
def test_corrupt_checkpoint_is_refused_and_the_previous_one_used(single, tmp_path):
    root, runs = single
    run = tmp_path / "corrupt"
    shutil.copytree(runs["a"] / "ckpt", run / "ckpt")
    newest = next((run / "ckpt" / f"step_{STEPS:08d}").glob("*.distcp"))
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    argv = ["train", GNTS, *sets(TINY), *run_args(run)]
    output = ok(launch(argv))
    assert "corrupt or truncated" in output
    assert f"resumed from {run / 'ckpt' / f'step_{STEPS - 2:08d}'} at step {STEPS - 2}" in output
    a, again = final_params(runs["a"], tmp_path), final_params(run, tmp_path)
    assert all(torch.equal(a[k], again[k]) for k in a)

    for path in (run / "ckpt").glob("step_*/*.distcp"):  # now every one is bad (a flipped byte)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    code, out, err = finish(launch(argv))
    assert code == 1, out + err
    assert "none is valid" in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_ddp_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_reference):
    ref = tiny_reference("ddp")  # the uninterrupted run (shared, conftest.py)
    runs = {"ddp_killed": tmp_path / "ddp_killed"}
    common = ["train", GNTS, *sets([*TINY, "distributed.strategy=ddp"])]
    killed = launch(
        [*common, *run_args(runs["ddp_killed"])],
        fault(runs["ddp_killed"], 5, rank=1),
        torchrun=["--nproc-per-node", "2", "--max-restarts", "1"],
    )
    output = ok(killed)
    runs["ddp"] = ref.done()
    assert (runs["ddp_killed"] / "fault.marker").exists()
    assert f"at step {4}" in output  # resumed from the step-4 checkpoint
    reference, resumed = records(runs["ddp"]), records(runs["ddp_killed"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["schedule"] for r in resumed] == [r["schedule"] for r in reference]
    assert [r["micro_steps"] for r in resumed] == [r["micro_steps"] for r in reference]
    a, b = final_params(runs["ddp"], tmp_path), final_params(runs["ddp_killed"], tmp_path)
    for key in a:
        scale = a[key].abs().max().clamp_min(1e-12)
        assert ((a[key] - b[key]).abs().max() / scale).item() <= 1e-6, key


@pytest.mark.slow
def test_torchrun_fsdp_completes(tmp_path, tiny_reference):
    # The session's shared FSDP2 run of `TINY` under torchrun, 2 ranks (conftest.py).
    run = tiny_reference("fsdp").done()
    manifest = json.loads((run / "ckpt" / f"step_{STEPS:08d}" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2
    assert len(records(run)) == STEPS
    params = final_params(run, tmp_path)
    assert all(torch.isfinite(v).all() for v in params.values())


def test_train_in_process_reports_and_resumes(tmp_path):
    """The programmatic entry: ``report`` every ``log_every`` steps on the values the
    step used; a second call finds the final checkpoint and trains nothing."""
    from schedany.config import load_config
    from schedany.job import train

    config = load_config(
        GNTS,
        [
            *TINY,
            "train.steps=4",
            "train.checkpoint_every=0",
            "train.progress=none",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        ],
    )
    calls: list[tuple[dict[str, float], str | None]] = []
    result = train(config, report=lambda metrics, path: calls.append((metrics, path)))
    assert [m["global_step"] for m, _ in calls] == [2.0, 4.0]
    assert calls[0][1] is None and calls[1][1] == str(tmp_path / "ckpt" / "step_00000004")
    first = calls[0][0]
    assert first["schedule/lr/decay"] == first["schedule/lr/no_decay"] == pytest.approx(3e-4)
    assert first["schedule/weight_decay/no_decay"] == 0.0
    assert {"train/loss", "control/grad_norm", "control/threshold"} <= first.keys()
    assert "eval/loss" in calls[1][0] and result.eval_loss == calls[1][0]["eval/loss"]
    assert (result.step, result.resumed_from) == (4, None)

    calls.clear()
    again = train(config, report=lambda metrics, path: calls.append((metrics, path)))
    assert (again.step, again.resumed_from, calls) == (4, 4, [])
    assert again.eval_loss == result.eval_loss

    from schedany.job.checkpoint import CheckpointError

    other = load_config(
        GNTS,
        [
            *TINY,
            "train.steps=6",
            "train.progress=none",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            "schedules.weight_decay={curve: constant_schedule, value: 1.0}",
            "schedules.momentum_like={curve: constant_schedule, value: 1.0}",
            "extend.momentum_like=0.5",
        ],
    )
    with pytest.raises(CheckpointError, match=r"does not fit this config .*momentum_like"):
        train(other)


def test_progress_bar_and_lines():
    import io

    from schedany.job._console import Console

    bar = io.StringIO()
    console = Console("bar", total=3, initial=0, enabled=True, stream=bar)
    for step in (1, 2, 3):
        console.update({"train/loss": 2.5, "lr": 1e-3} if step == 3 else None)
    console.close()
    assert "3/3" in bar.getvalue() and "lr=0.001" in bar.getvalue()

    lines = io.StringIO()
    console = Console("auto", total=3, initial=0, enabled=True, stream=lines)  # not a TTY
    console.log(3, {"train/loss": 2.5})
    assert lines.getvalue().startswith("step 3/3  train/loss 2.5  (")
    silent = io.StringIO()
    Console("lines", total=3, initial=0, enabled=False, stream=silent).log(3, {"x": 1.0})
    assert silent.getvalue() == ""
