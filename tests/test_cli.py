"""The ``schedany`` command line: exit codes, messages, and nothing written on a bad config.

Invariant: a bad config or bad arguments exit 2 with one message naming the path and
no traceback, before anything is written to the log or checkpoint folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from schedany.cli import main

GOOD = """\
seed: 0
model: {d_model: 16, n_layers: 1, n_heads: 2, seq_len: 16}
data: {max_bytes: 50000, eval_windows: 4}
optimizer:
  name: AdamW
  lr: 1.0e-3
  weight_decay: 0.1
  param_groups: {no_decay: {weight_decay: 0.0}}
extend: {gradient_norm_threshold: 1.0}
schedules:
  lr: {curve: cosine_annealing_with_warmup, warmup_to_value: 1.0, anneal_to_value: 0.1,
       num_warmup_steps: 2, num_training_steps: 8}
  gradient_norm_threshold: {curve: constant_schedule, value: 1.0}
control: {kind: gnts, max_accumulation_steps: 2}
train: {steps: 8, micro_batch_size: 2, log_dir: LOGS, checkpoint_dir: CKPT}
"""


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.yaml"
    text = GOOD.replace("LOGS", str(tmp_path / "logs")).replace("CKPT", str(tmp_path / "ckpt"))
    path.write_text(text)
    return path


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return path


# (how to break the good config, expected start of the message after "error: ")
BROKEN = [
    ("yaml-syntax", lambda p: edit(p, "seed: 0", "seed: [0"), ["good.yaml: invalid YAML (line"]),
    (
        "python-tag",
        lambda p: edit(p, "seed: 0", "seed: !!python/object/apply:os.getcwd []"),
        ["good.yaml: refused YAML tag tag:yaml.org,2002:python/object/apply:os.getcwd"],
    ),
    ("unknown-block", lambda p: edit(p, "seed: 0", "sed: 0"), ["sed: unknown block"]),
    (
        "unknown-field",
        lambda p: edit(p, "micro_batch_size", "microbatch_size"),
        ["train.microbatch_size: unknown field (did you mean 'micro_batch_size'?)"],
    ),
    (
        "wrong-type",
        lambda p: edit(p, "steps: 8", "steps: eight"),
        ["train.steps: expected an integer >= 1, got 'eight'"],
    ),
    (
        "negative-steps",
        ["--set", "train.steps=-3"],
        ["train.steps: expected an integer >= 1, got -3"],
    ),
    (
        "warmup-longer",
        ["--set", "schedules.lr.num_warmup_steps=20"],
        ["schedules.lr.num_training_steps: expected an integer >= num_warmup_steps (20), got 8"],
    ),
    ("unknown-curve", ["--set", "schedules.lr.curve=cosine"], ["schedules.lr.curve: expected a"]),
    (
        "unknown-scheduler",
        ["--set", "schedules.gradient_norm_threshold={scheduler: StepLr}"],
        [
            "schedules.gradient_norm_threshold.scheduler: expected a class of "
            "torch.optim.lr_scheduler (did you mean 'StepLR'?)"
        ],
    ),
    (
        "function-scheduler",
        ["--set", "schedules.gradient_norm_threshold={scheduler: LambdaLR}"],
        ["schedules.gradient_norm_threshold.scheduler: LambdaLR cannot be built from a config"],
    ),
    (
        "plateau",
        ["--set", "schedules.lr={scheduler: ReduceLROnPlateau}"],
        ["schedules.lr.scheduler: ReduceLROnPlateau needs a metric"],
    ),
    (
        "unknown-optimizer",
        ["--set", "optimizer.name=Adamm"],
        ["optimizer.name: expected a class of torch.optim"],
    ),
    (
        "optimizer-argument",
        ["--set", "optimizer.nesterov=true"],
        ["optimizer.nesterov: unknown argument of torch.optim.AdamW"],
    ),
    (
        "param-group",
        ["--set", "optimizer.param_groups.embeddings={}"],
        ["optimizer.param_groups.embeddings: unknown param group"],
    ),
    (
        "target-absent",
        ["--set", "schedules.momentum={curve: constant_schedule, value: 1.0}"],
        ["schedules.momentum: param_groups[0] has no key 'momentum'"],
    ),
    (
        "betas-5",
        ["--set", "schedules.betas[5]={curve: constant_schedule, value: 1.0}"],
        ["schedules.betas[5]: index 5 is out of range"],
    ),
    (
        "gnts-without-key",
        lambda p: edit(
            edit(p, "extend: {gradient_norm_threshold: 1.0}\n", ""),
            "  gradient_norm_threshold: {curve: constant_schedule, value: 1.0}\n",
            "",
        ),
        ["control.key: control.kind gnts reads optimizer key 'gradient_norm_threshold'"],
    ),
    (
        "extend-existing",
        ["--set", "extend.weight_decay=0.5"],
        ["extend.weight_decay: the optimizer already has this key"],
    ),
    ("no-schedules", ["--set", "schedules={}"], ["schedules: expected at least one schedule"]),
    (
        "control-kind",
        ["--set", "control.kind=pid"],
        ["control.kind: expected one of none, logical_batch, gnts, got 'pid'"],
    ),
    (
        "strategy",
        ["--set", "distributed.strategy=deepspeed"],
        ["distributed.strategy: expected one of auto, none, ddp, fsdp, got 'deepspeed'"],
    ),
    (
        "n-heads",
        ["--set", "model.n_heads=3"],
        ["model.n_heads: expected a divisor of model.d_model (16), got 3"],
    ),
    ("data-path", ["--set", "data.path=/no/such/dir"], ["data.path: expected an existing folder"]),
    ("set-malformed", ["--set", "train.steps"], ["--set train.steps: expected KEY=VALUE"]),
    ("set-into-scalar", ["--set", "seed.x=1"], ["seed: is 0, not a mapping"]),
    ("set-bad-yaml", ["--set", "train.steps={"], ["--set train.steps={: invalid YAML"]),
    ("missing-file", lambda p: p.unlink(), ["good.yaml: no such file"]),
    ("not-a-mapping", lambda p: p.write_text("- 1\n"), ["good.yaml: expected a mapping of blocks"]),
    (
        "duplicate-key",
        lambda p: p.write_text(p.read_text() + "seed: 1\n"),
        ["duplicate key 'seed'"],
    ),
    # Found only when the job starts, still before anything is written.
    ("empty-data-folder", "EMPTY", ["data.path: load_corpus: no documents"]),
    (
        "ddp-without-torchrun",
        ["--set", "distributed.strategy=ddp"],
        ["distributed.strategy: 'ddp' needs a process group; launch with torchrun"],
    ),
]


@pytest.mark.parametrize("how, wants", [(b[1], b[2]) for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_bad_config_exits_2_naming_the_path_and_writes_nothing(good, tmp_path, capsys, how, wants):
    extra: list[str] = []
    if how == "EMPTY":
        (tmp_path / "empty").mkdir()
        extra = ["--set", f"data.path={tmp_path / 'empty'}"]
    elif callable(how):
        how(good)
    else:
        extra = list(how)
    code = main(["train", str(good), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("schedany train: error: ")
    for want in wants:
        assert want in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


def test_at_least_25_broken_configs():
    assert len(BROKEN) >= 25


def test_validate_prints_the_resolved_schedule(good, capsys):
    assert main(["validate", str(good), "--set", "train.steps=5", "--yaml"]) == 0
    out = capsys.readouterr().out
    assert f"{good}: valid" in out
    assert "param groups: decay, no_decay" in out
    assert "control    gnts on 'gradient_norm_threshold' (tokens, at most 2 micro-steps)" in out
    rows = {
        tuple(line.split()[:2]): line.split()[2:]
        for line in out.splitlines()
        if line.startswith("  lr ") or line.startswith("  gradient_norm_threshold ")
    }
    # steps 1, 2, 3, 5: warmup 0 -> 1e-3 over 2 steps, then cosine towards 1e-4 at t=8
    assert rows[("lr", "decay")][:2] == ["0", "0.0005"]
    assert rows[("gradient_norm_threshold", "no_decay")] == ["1"] * 4
    assert "schedules:\n  lr:\n    curve: cosine_annealing_with_warmup" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train"],
        ["frobnicate", "x.yaml"],
        ["preview", "x.yaml", "--steps", "0"],
        ["tune", "s.yaml", "--num-samples", "many"],
        ["validate", "x.yaml", "--bogus"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: schedany" in capsys.readouterr().err


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "schedany", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.slow
def test_real_process_exit_codes(good, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: !!python/object/new:os.system [echo pwned]\n")
    result = run_cli("train", str(bad), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "refused YAML tag tag:yaml.org,2002:python/object/new:os.system" in result.stderr
    assert "Traceback" not in result.stderr and "pwned" not in result.stdout

    result = run_cli(
        "validate", str(good), "--set", "schedules.lr.num_warmup_steps=-5", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr == (
        "schedany validate: error: schedules.lr.num_warmup_steps: "
        "expected an integer >= 0, got -5\n"
    )

    result = run_cli("train", cwd=tmp_path)
    assert (
        result.returncode == 2 and "the following arguments are required: CONFIG" in result.stderr
    )
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("schedany") is None, reason="console script not installed")
def test_console_script(good, tmp_path):
    result = subprocess.run(
        ["schedany", "validate", str(good)], text=True, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
