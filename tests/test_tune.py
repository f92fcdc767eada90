"""Ray Tune adapter: sweep files, search spaces, PBT explore/restore, and real sweeps.

The slow tests run real sweeps through ``python -m schedany tune`` on a small Ray:
one embedded local Ray (the default), and one ``ray start --head`` on loopback shared
by the PBT, ASHA and multi-worker tests (through ``--address``). The head runs in its own temp
folder and is stopped by killing the processes it started (``ray stop`` would stop
every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("ray.tune", reason="the Ray Tune adapter needs ray[tune] (schedany[tune])")

from schedany import SynchronousSchedule  # noqa: E402
from schedany.cli import main  # noqa: E402
from schedany.config import ConfigError, build_schedule, parse_config  # noqa: E402
from schedany.curves import warmup_anneal_curve  # noqa: E402
from schedany.integrations._sweep import load_sweep  # noqa: E402
from schedany.integrations._tune_space import (  # noqa: E402
    LegalExplore,
    parse_distribution,
    parse_search,
    resolve_trial_config,
)
from schedany.integrations.ray_tune import ClusterError, parse_address, ray_session  # noqa: E402
from schedany.job.build import build_run  # noqa: E402
from schedany.job.rebuild import advance, rebuild_at_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LR = 1.0e-2

BASE: dict[str, Any] = {
    "seed": 0,
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 32},
    "data": {"eval_windows": 4, "eval_batch_size": 4, "eval_fraction": 0.3},
    "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": 0.0},
    "schedules": {
        "lr": {
            "curve": "cosine_annealing_with_warmup",
            "warmup_to_value": 1.0,
            "anneal_to_value": 0.1,
            "num_warmup_steps": 5,
            "num_training_steps": 15,
        },
    },
    "train": {"steps": 15, "micro_batch_size": 2, "log_every": 5},
}

THRESHOLD = {
    "curve": "cosine_annealing_with_inverse_warmup",
    "warmup_to_value": 1.0,
    "anneal_to_value": 0.5,
    "num_warmup_steps": 14,
    "num_training_steps": 15,
    "warmup_multiplier": 20.0,
}


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text corpus and a base train config."""
    root = tmp_path_factory.mktemp("tune")
    corpus = root / "corpus"
    corpus.mkdir()
    for module in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "glob.py"):
        src = Path(os.__file__).parent / module
        (corpus / module.replace("/", "_")).write_bytes(src.read_bytes()[:6000])
    base = copy.deepcopy(BASE)
    base["data"]["path"] = str(corpus)
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


def write_sweep(folder: Path, name: str, **blocks: Any) -> Path:
    sweep = {"base": "base.yaml", **blocks}
    sweep.setdefault("tune", {})
    sweep["tune"].setdefault("storage_path", str(folder / "runs"))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 150
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "schedany", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def trial_rows(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's reported results, in order."""
    rows = {}
    for result in sorted(experiment.glob("*/result.json")):
        rows[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines()]
    return rows


def step_records(trial_dir: Path) -> dict[int, dict[str, Any]]:
    """The job's per-step ``metrics.jsonl`` (the last record of each step wins)."""
    records = {}
    for line in (trial_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def lr_curve(warmup: int) -> Any:
    return warmup_anneal_curve(
        warmup_to_value=1.0, anneal_to_value=0.1, num_warmup_steps=warmup, num_training_steps=15
    )


def threshold_curve(multiplier: float) -> Any:
    args = {k: v for k, v in THRESHOLD.items() if k != "curve"} | {"warmup_multiplier": multiplier}
    return warmup_anneal_curve(anneal="cosine", warmup="inverse", **args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- search spaces and sweep files (no Ray) ----------------------------------------------


def test_distributions_parse_and_clamp() -> None:
    space = parse_search(
        {
            "a": {"uniform": [0.5, 2]},
            "b": {"randint": [5, 50]},
            "c": {"choice": ["x", "y"]},
            "d": {"grid": [1, 2, 4]},
            "e": {"loguniform": [1e-4, 1e-2]},
        }
    )
    assert space["b"].clamp(51.7) == 50 and isinstance(space["b"].clamp(7.4), int)
    assert space["a"].clamp(-3) == 0.5 and space["e"].clamp(1.0) == 1e-2
    assert space["c"].clamp("z") == "x" and space["d"].clamp(3.2) == 4
    domain = space["b"].to_tune()
    assert (domain.lower, domain.upper) == (5, 51)  # tune.randint excludes its upper end
    assert space["d"].to_tune() == {"grid_search": [1, 2, 4]}
    for spec, match in [
        ({"normal": [0, 1]}, "unknown distribution 'normal'"),
        ({"uniform": [2, 1]}, r"search\.p\.uniform: expected low < high"),
        ({"randint": [1.5, 3]}, "expected two integers"),
        ({"loguniform": [0, 1]}, "expected 0 < low < high"),
        ({"grid": []}, "non-empty list"),
        ({"grid": [1], "choice": [2]}, "exactly one of"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_distribution(spec, "search.p")


BAD_SWEEPS = [
    (
        {"search": {"schedules.lr.num_warmup_stepz": {"grid": [1]}}},
        r"search\.schedules\.lr\.num_warmup_stepz: unknown config path",
    ),
    (
        {"search": {"schedules.momentum.num_warmup_steps": {"grid": [1]}}},
        r"search\.schedules\.momentum\.num_warmup_steps: unknown config path",
    ),
    (
        {"search": {"modell.d_model": {"grid": [8]}}},
        r"search\.modell\.d_model: unknown config path",
    ),
    (
        {"search": {"schedules.lr.num_warmup_steps": {"gaussian": [1, 2]}}},
        r"search\.schedules\.lr\.num_warmup_steps: unknown distribution",
    ),
    (
        {"search": {"schedules.lr.num_warmup_steps": {"uniform": [1, 5]}}},
        r"search\.schedules\.lr\.num_warmup_steps: uniform value 1\.0 .*expected an integer",
    ),
    (
        {"search": {"schedules.lr.num_warmup_steps": {"randint": [1, 40]}}},
        r"search\.schedules\.lr\.num_warmup_steps: randint value 40 .*num_training_steps",
    ),
    (
        {"search": {"schedules.lr.curve": {"choice": ["cosine_annealing_with_warmup", "nope"]}}},
        r"search\.schedules\.lr\.curve: choice value 'nope'",
    ),
    ({"search": {}}, r"^search: expected at least one"),
    (
        {"search": {"schedules.lr.num_warmup_steps": {"grid": [1]}}, "tune": {"metric": "acc"}},
        r"tune\.metric: expected one of",
    ),
    (
        {"search": {"schedules.lr.num_warmup_steps": {"grid": [1]}}, "tune": {"schedulr": "pbt"}},
        r"tune\.schedulr: unknown field",
    ),
    (
        {
            "search": {"schedules.lr.num_warmup_steps": {"grid": [1, 2]}},
            "tune": {
                "scheduler": "pbt",
                "pbt": {"perturbation_interval": 5},
                "resources": {"workers": 2},
            },
        },
        r"tune\.resources\.workers: scheduler pbt cannot run multi-worker trials",
    ),
    (
        {
            "search": {"schedules.lr.num_warmup_steps": {"grid": [1, 2]}},
            "tune": {"scheduler": "pbt", "pbt": {"perturbation_interval": 7}},
        },
        r"tune\.pbt\.perturbation_interval: expected a multiple of train\.log_every \(5\)",
    ),
    (
        {
            "search": {"model.d_model": {"grid": [16, 32]}},
            "tune": {"scheduler": "pbt", "pbt": {"perturbation_interval": 5}},
        },
        r"search\.model\.d_model: PBT restores",
    ),
    (
        {"search": {"schedules.lr.num_warmup_steps": {"grid": [1]}}, "set": {"train.stepz": 3}},
        r"base: .*train\.stepz: unknown field",
    ),
]


# A token budget and reports every 360 tokens (the base config counts steps).
TOKENS = {"train.steps": None, "train.tokens": 1800, "train.axis": "tokens", "train.log_every": 360}
WARMUP_GRID = {"schedules.lr.num_warmup_steps": {"grid": [1, 2]}}


def token_lr(total: int) -> dict[str, Any]:
    """The base lr curve counted in tokens: 180 tokens of warmup, ``total`` in all."""
    return {
        **BASE["schedules"]["lr"],
        "unit": "tokens",
        "num_warmup_steps": 180,
        "num_training_steps": total,
    }


BAD_SWEEPS += [
    (
        {"search": WARMUP_GRID, "tune": {"scheduler": "asha", "time_attr": "clock/tokenz"}},
        r"tune\.time_attr: expected one of .*clock/tokens.*got 'clock/tokenz'",
    ),
    (
        {"search": WARMUP_GRID, "tune": {"scheduler": "asha", "time_attr": "clock/tokens"}},
        r"tune\.time_attr: clock/tokens counts tokens, but train\.axis is steps: .*"
        r"set train\.axis: tokens .* or tune\.time_attr: global_step",
    ),
    (
        {"set": TOKENS, "search": WARMUP_GRID, "tune": {"scheduler": "pbt"}},
        r"tune\.time_attr: global_step counts steps, but train\.axis is tokens: .*"
        r"or tune\.time_attr: clock/tokens",
    ),
    (
        {
            "set": {**TOKENS, "train.tokens": None, "train.steps": 15},
            "search": WARMUP_GRID,
            "tune": {"scheduler": "asha", "time_attr": "clock/tokens"},
        },
        r"tune\.asha\.max_t: required field is missing \(tune\.time_attr clock/tokens "
        r"counts tokens but the budget is train\.steps",
    ),
    (
        {
            "set": TOKENS,
            "search": WARMUP_GRID,
            "tune": {"scheduler": "asha", "time_attr": "clock/tokens", "asha": {"max_t": 2000}},
        },
        r"tune\.asha\.max_t: expected at most train\.tokens \(1800\), got 2000",
    ),
    (
        {
            "set": TOKENS,
            "search": WARMUP_GRID,
            "tune": {"scheduler": "asha", "time_attr": "clock/tokens", "asha": {"max_t": 300}},
        },
        r"tune\.asha\.grace_period: expected at most max_t \(300\), got 360",
    ),
    (
        {
            "set": TOKENS,
            "search": WARMUP_GRID,
            "tune": {
                "scheduler": "pbt",
                "time_attr": "clock/tokens",
                "pbt": {"perturbation_interval": 500},
            },
        },
        r"tune\.pbt\.perturbation_interval: expected a multiple of train\.log_every \(360\), "
        r"the cadence in tokens",
    ),
    (
        {
            "set": TOKENS,
            "search": WARMUP_GRID,
            "tune": {
                "scheduler": "pbt",
                "time_attr": "clock/tokens",
                "pbt": {"perturbation_interval": 1800},
            },
        },
        r"tune\.pbt\.perturbation_interval: expected less than train\.tokens \(1800\)",
    ),
]


@pytest.mark.parametrize(("blocks", "match"), BAD_SWEEPS)
def test_bad_sweep_files_name_the_path(workdir: Path, blocks: dict[str, Any], match: str) -> None:
    path = write_sweep(workdir, "bad", **blocks)
    with pytest.raises(ConfigError, match=match):
        load_sweep(path)


def test_time_attr_sets_the_schedulers_unit(workdir: Path) -> None:
    """ASHA's and PBT's limits default to the budget and cadence in the time_attr's unit,
    and the schedulers count the report's cadence multiple of that unit."""
    from schedany.integrations._tune_run import tune_metrics
    from schedany.integrations.ray_tune import make_scheduler, scheduler_time_attr

    steps = load_sweep(write_sweep(workdir, "t0", search=WARMUP_GRID, tune={"scheduler": "asha"}))
    assert scheduler_time_attr(steps) == "global_step"  # the default: optimizer steps
    assert (steps.tune.asha.max_t, steps.tune.asha.grace_period) == (15, 5)
    tune = {"scheduler": "asha", "time_attr": "clock/tokens"}
    tokens = load_sweep(write_sweep(workdir, "t1", set=TOKENS, search=WARMUP_GRID, tune=tune))
    assert tokens.time_unit == "tokens" and scheduler_time_attr(tokens) == "report/tokens"
    assert (tokens.tune.asha.max_t, tokens.tune.asha.grace_period) == (1800, 360)
    assert make_scheduler(tokens) is not None
    # A step budget with a token time_attr: max_t is given in tokens (train.steps is None
    # in the other sweeps, a number here; neither is read as the other's unit).
    by_steps = {**TOKENS, "train.tokens": None, "train.steps": 15}
    tune = {**tune, "asha": {"max_t": 5000}}
    mixed = load_sweep(write_sweep(workdir, "t2", set=by_steps, search=WARMUP_GRID, tune=tune))
    assert (mixed.tune.asha.max_t, mixed.tune.asha.grace_period) == (5000, 360)
    tune = {"scheduler": "pbt", "time_attr": "clock/tokens", "pbt": {"perturbation_interval": 720}}
    pbt = load_sweep(write_sweep(workdir, "t3", set=TOKENS, search=WARMUP_GRID, tune=tune))
    assert scheduler_time_attr(pbt) == "report/tokens" and make_scheduler(pbt) is not None
    # A report comes at the first step past a multiple of log_every: the schedulers see
    # that multiple; the readings themselves are reported as they are.
    metrics = {"global_step": 6.0, "clock/steps": 6.0, "clock/samples": 48.0, "clock/tokens": 848.0}
    out = tune_metrics({**metrics, "eval/loss": 4.5}, tokens.config.train)
    assert out == {
        "global_step": 6,
        "clock/steps": 6,
        "clock/samples": 48,
        "clock/tokens": 848,
        "eval/loss": 4.5,
        "report/tokens": 720,
    }
    assert all(isinstance(out[k], int) for k in metrics)


def test_bad_time_attr_exits_2_through_the_cli(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tune = {"scheduler": "asha", "time_attr": "clock/tokenz"}
    path = write_sweep(workdir, "bad_time", set=TOKENS, search=WARMUP_GRID, tune=tune)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tune.time_attr: expected one of" in err and "'clock/tokenz'" in err
    assert "Traceback" not in err and not (workdir / "runs" / "bad_time").exists()


@pytest.mark.parametrize("name", ["warmup_grid", "lr_shape_asha", "gnts_pbt"])
def test_example_sweeps_are_valid(name: str) -> None:
    sweep = load_sweep(REPO / "examples" / "sweeps" / f"{name}.yaml")
    assert sweep.search and sweep.name == name


def test_a_trial_too_big_for_the_local_ray_is_refused() -> None:
    from schedany.integrations._sweep import ResourcesSection
    from schedany.integrations.ray_tune import Connection, _check_fits

    local = Connection("local", "local", 2.0)
    _check_fits(ResourcesSection(cpus=1.0, workers=2), Connection("cluster", "auto", 2.0))
    _check_fits(ResourcesSection(cpus=0.5, workers=2), local)
    with pytest.raises(ConfigError, match=r"tune\.resources: one trial needs 2\.01 CPUs"):
        _check_fits(ResourcesSection(cpus=1.0, workers=2), local)


def test_bad_sweep_exits_2_through_the_cli(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(workdir, "bad_cli", search={"schedules.lr.num_warmup_stepz": {"grid": [1]}})
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.schedules.lr.num_warmup_stepz: unknown config path" in err
    assert "Traceback" not in err
    assert main(["tune", str(workdir / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_address_parsing_and_fast_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_address("auto") is None
    assert parse_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert parse_address("ray://head.example:10001") == ("head.example", 10001)
    for bad in ("localhost", "host:99999", "http://x:1", ""):
        with pytest.raises(ConfigError, match="--address: expected 'auto', HOST:PORT"):
            parse_address(bad)
    monkeypatch.setenv("RAY_ADDRESS", "localhost")
    with pytest.raises(ConfigError, match="^RAY_ADDRESS: expected 'auto', HOST:PORT"):
        with ray_session(None):
            pass
    monkeypatch.delenv("RAY_ADDRESS")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:"):
        with ray_session(f"127.0.0.1:{free_port()}"):
            pass
    assert time.monotonic() - start < 5


def test_bad_address_exits_1_without_traceback(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(workdir, "addr", search={"schedules.lr.num_warmup_steps": {"grid": [1]}})
    start = time.monotonic()
    assert main(["tune", str(path), "--address", f"127.0.0.1:{free_port()}"]) == 1
    out = capsys.readouterr()
    assert "cannot reach a Ray cluster at 127.0.0.1:" in out.err
    assert "Traceback" not in out.err + out.out
    assert time.monotonic() - start < 10
    assert main(["tune", str(path), "--address", "not-an-address"]) == 2
    assert "--address: expected 'auto', HOST:PORT" in capsys.readouterr().err


# --- PBT explore and restore (no Ray) ---------------------------------------------------


def test_legal_explore_keeps_values_legal() -> None:
    base = copy.deepcopy(BASE)
    mutations = parse_search(
        {
            "schedules.lr.num_warmup_steps": {"randint": [0, 15]},
            "schedules.lr.anneal_to_value": {"uniform": [0.0, 0.5]},
            "schedules.lr.curve": {
                "choice": ["cosine_annealing_with_warmup", "linear_schedule_with_warmup"]
            },
        }
    )
    explore = LegalExplore(base, mutations)
    out = explore(
        {
            "schedules.lr.num_warmup_steps": 14.4,
            "schedules.lr.anneal_to_value": 0.9,
            "schedules.lr.curve": "quadratic_schedule_with_warmup",
        }
    )
    assert out == {
        "schedules.lr.num_warmup_steps": 14,
        "schedules.lr.anneal_to_value": 0.5,
        "schedules.lr.curve": "cosine_annealing_with_warmup",
    }
    assert isinstance(out["schedules.lr.num_warmup_steps"], int)
    # warmup <= training steps, whichever of the two was mutated
    both = LegalExplore(
        base,
        parse_search(
            {
                "schedules.lr.num_warmup_steps": {"randint": [0, 40]},
                "schedules.lr.num_training_steps": {"randint": [10, 40]},
            }
        ),
    )
    out = both({"schedules.lr.num_warmup_steps": 30, "schedules.lr.num_training_steps": 12})
    assert out["schedules.lr.num_warmup_steps"] == 12
    only_total = LegalExplore(
        base, parse_search({"schedules.lr.num_training_steps": {"randint": [1, 40]}})
    )
    out = only_total({"schedules.lr.num_training_steps": 3})
    assert out == {"schedules.lr.num_training_steps": 5}  # raised to the base warmup
    resolve_trial_config(base, out)


def _config(multiplier: float) -> Any:
    data = copy.deepcopy(BASE)
    data["extend"] = {"gradient_norm_threshold": 1.0}
    data["schedules"]["gradient_norm_threshold"] = dict(THRESHOLD, warmup_multiplier=multiplier)
    return parse_config(data)


def test_rebuild_at_step_uses_the_new_curve_and_the_old_state() -> None:
    """After a restore into a mutated config, every scheduled key follows the new
    curve from the restored step on; the optimizer's moments are the donor's."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3))]
    donor_opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    donor = build_schedule(donor_opt, _config(20.0))
    for _ in range(8):
        params[0].grad = torch.randn(3)
        donor_opt.step()
        donor.step()
    saved = copy.deepcopy(donor_opt.state_dict())

    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = build_schedule(opt, _config(3.0))
    rebuild_at_step(opt, schedule, saved, 8)
    new = threshold_curve(3.0)
    assert opt.param_groups[0]["gradient_norm_threshold"] == pytest.approx(new(8), rel=1e-12)
    assert new(8) != pytest.approx(threshold_curve(20.0)(8))
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_curve(5)(8), rel=1e-12)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    for t in range(9, 12):  # and it goes on along the new curve
        opt.step()
        schedule.step()
        assert schedule.get_last_schedule("gradient_norm_threshold") == [
            pytest.approx(new(t), rel=1e-12)
        ]
    with pytest.raises(ValueError, match="fresh from its config"):
        rebuild_at_step(opt, schedule, saved, 8)


def test_advance_replays_chainable_schedulers_exactly() -> None:
    data = copy.deepcopy(BASE)
    data["schedules"]["weight_decay"] = {"scheduler": "StepLR", "step_size": 3, "gamma": 0.5}
    data["optimizer"]["weight_decay"] = 0.1
    config = parse_config(data)
    opt_a, run_a = build_run(config)
    for _ in range(7):
        opt_a.step()
        run_a.step()
    opt_b, run_b = build_run(config)
    advance(run_b, 7)
    assert isinstance(run_b, SynchronousSchedule)
    for name in run_a.schedule_names:
        assert run_a.get_last_schedule(name) == run_b.get_last_schedule(name)


def test_user_report_and_restore_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report() sends global_step, the scheduled values and a checkpoint; restore()
    into a mutated config rebuilds the schedule there (Tune's session faked)."""
    from ray import tune

    from schedany.integrations import ray_tune

    reported: list[tuple[dict[str, Any], Path | None]] = []

    def fake_report(metrics: dict[str, Any], *, checkpoint: Any = None) -> None:
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"ckpt{len(reported)}"
            shutil.copytree(checkpoint.path, kept)
        reported.append((metrics, kept))

    monkeypatch.setattr(tune, "report", fake_report)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = build_schedule(opt, _config(20.0))
    for step in range(1, 7):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 3 == 0:
            ray_tune.report(step, schedule, {"train/loss": 1.0}, model=model, optimizer=opt)
        schedule.step()
    metrics, folder = reported[-1]
    assert metrics["global_step"] == 6 and metrics["train/loss"] == 1.0
    assert metrics["schedule/gradient_norm_threshold/pg0"] == pytest.approx(
        threshold_curve(20.0)(5)
    )
    assert metrics["schedule/lr/pg0"] == pytest.approx(LR * lr_curve(5)(5))

    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(folder))
    model2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=LR, weight_decay=0.0)
    schedule2 = build_schedule(opt2, _config(3.0))
    assert ray_tune.restore(model=model2, optimizer=opt2, schedule=schedule2) == 6
    assert torch.equal(model2.weight, model.weight)
    assert opt2.param_groups[0]["gradient_norm_threshold"] == pytest.approx(threshold_curve(3.0)(6))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    assert (
        ray_tune.restore(
            model=model2,
            optimizer=opt2,
            schedule=build_schedule(torch.optim.AdamW(model2.parameters(), lr=LR), _config(3.0)),
        )
        == 0
    )


# --- real sweeps ------------------------------------------------------------------------


# Ray token authentication, as on a real cluster, with a token of this test session
# only (clients given an explicit address send a token only with RAY_AUTH_MODE=token).
HEAD_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real ``ray start --head`` on loopback, in its own temp folder."""
    port = free_port()
    temp = Path(f"/tmp/sa-ray-{os.getpid()}-{port}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | HEAD_AUTH
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            shutil.which("ray") or "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start --head failed; see {log.name}") from None
                time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS answers
        yield f"127.0.0.1:{port}"
    finally:
        # Stop exactly the head started here (its own process group), not every Ray
        # on the machine as `ray stop` would.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


GRID = [0, 6]  # two trials: one round on the 2 CPUs of the local Ray
WARMUP = "schedules.lr.num_warmup_steps"


@pytest.fixture(scope="module")
def grid_sweep(workdir: Path) -> subprocess.CompletedProcess[str]:
    """Two trials on an embedded local Ray, over the warmup length; run once for the
    tests that read it (results in ``workdir/runs/grid``). The first trial to finish
    step 10 is killed right after it, once (one marker for the whole sweep), and
    restarts from its checkpoint (max_failures 1)."""
    path = write_sweep(workdir, "grid", search={WARMUP: {"grid": GRID}}, tune={"max_failures": 1})
    fault = {"SCHEDANY_FAULT_AT_STEP": "10", "SCHEDANY_FAULT_MARKER": str(workdir / "grid.fault")}
    return cli("tune", str(path), env=fault, timeout=300)  # ~140 s on a loaded 2-core machine


@pytest.mark.slow
def test_grid_over_warmup_through_the_cli(
    workdir: Path, grid_sweep: subprocess.CompletedProcess[str]
) -> None:
    """Two trials on an embedded local Ray; each reports its own curve's lr."""
    warmups = GRID
    proc = grid_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on local Ray" in proc.stdout and "best config:" in proc.stdout
    experiment = workdir / "runs" / "grid"
    assert f"results: {experiment}" in proc.stdout
    assert (experiment / "best_config.yaml").is_file()
    rows = trial_rows(experiment)
    seen = set()
    for name, trial in rows.items():
        warmup = trial[0]["config"]["schedules.lr.num_warmup_steps"]
        seen.add(warmup)
        assert [r["global_step"] for r in trial] == [5, 10, 15]
        for r in trial:
            step = r["global_step"]  # the value that optimizer step used: t = step - 1
            assert r["schedule/lr/pg0"] == pytest.approx(LR * lr_curve(warmup)(step - 1), rel=1e-12)
            assert "eval/loss" in r and "train/loss" in r
        assert list((experiment / name / "logs").glob("events.out.tfevents.*"))
    assert seen == set(warmups)


@pytest.mark.slow
def test_each_trial_is_one_tensorboard_run_with_its_hparams(
    workdir: Path, grid_sweep: subprocess.CompletedProcess[str]
) -> None:
    """``tensorboard --logdir EXPERIMENT`` finds one run per trial, the job's: its HParams
    are the trial's searched value, its metrics the losses, ending at the last report."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    assert grid_sweep.returncode == 0, grid_sweep.stdout[-3000:] + grid_sweep.stderr[-3000:]
    experiment = workdir / "runs" / "grid"
    rows = trial_rows(experiment)
    runs = EventMultiplexer().AddRunsFromDirectory(str(experiment))
    runs.Reload()
    assert sorted(runs.Runs()) == sorted(f"{name}/logs" for name in rows)
    hparams = runs.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    seen = []
    for name, trial in rows.items():
        run = f"{name}/logs"
        summary = metadata.parse_experiment_plugin_data(hparams[run][metadata.EXPERIMENT_TAG])
        assert [h.name for h in summary.hparam_infos] == [WARMUP]
        assert [m.name.tag for m in summary.metric_infos] == ["eval/loss", "train/loss"]
        start = metadata.parse_session_start_info_plugin_data(
            hparams[run][metadata.SESSION_START_INFO_TAG]
        )
        seen.append(start.hparams[WARMUP].number_value)
        assert seen[-1] == trial[0]["config"][WARMUP]
        last = trial[-1]
        for tag in ("eval/loss", "train/loss"):
            final = runs.Scalars(run, tag)[-1]  # what the HParams tab shows
            assert final.step == last["global_step"]
            assert final.value == struct.unpack("f", struct.pack("f", last[tag]))[0]
    assert sorted(seen) == GRID


@pytest.mark.slow
def test_pbt_exploit_rebuilds_the_schedule(workdir: Path, ray_head: str) -> None:
    """After an exploit, the trial reports the explored curve from the restored step
    on, and its steps continue from the donor's checkpoint."""
    path_key = "schedules.gradient_norm_threshold.warmup_multiplier"
    path = write_sweep(
        workdir,
        "pbt",
        set={
            "extend": {"gradient_norm_threshold": 1.0},
            "schedules.gradient_norm_threshold": THRESHOLD,
            "control": {"kind": "gnts", "max_accumulation_steps": 2},
        },
        search={path_key: {"grid": [2.0, 40.0]}},
        tune={
            "scheduler": "pbt",
            "pbt": {
                "perturbation_interval": 10,
                "quantile_fraction": 0.5,
                "resample_probability": 0.0,
                "synch": True,
                "mutations": {path_key: {"uniform": [1.5, 100.0]}},
            },
        },
    )
    proc = cli("tune", str(path), "--address", ray_head, env=HEAD_AUTH)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"on cluster Ray ({ray_head})" in proc.stdout
    experiment = workdir / "runs" / "pbt"
    rows = trial_rows(experiment)
    assert len(rows) == 2
    for name, trial in rows.items():  # every report follows the config the trial had then
        # Run to the end, by the job's own records (Ray's result.json of a paused and
        # resumed trial can lose rows after its last sync; see the PBT-on-tokens test).
        assert trial and max(step_records(experiment / name)) == 15
        for r in trial:
            expected = threshold_curve(r["config"][path_key])(r["global_step"] - 1)
            assert r["schedule/gradient_norm_threshold/pg0"] == pytest.approx(expected, rel=1e-12)
    # PBT's own log: [target tag, donor tag, target iteration, donor iteration,
    # donor config, explored config], one line per exploit.
    exploits = [
        json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()
    ]
    assert exploits, "no trial was exploited"
    target_tag, _, _, _, donor_config, new_config = exploits[0]
    restored = 10  # synch: both trials stop at step 10, the donor's checkpoint is step 10
    donor_value, new = donor_config[path_key], new_config[path_key]
    assert new in (pytest.approx(donor_value * 1.2), pytest.approx(donor_value * 0.8))
    (name,) = [n for n in rows if f"_{target_tag}_" in n]
    old = 40.0 if "40.0000" in target_tag else 2.0
    # The job's per-step record of the exploited trial: its own steps up to the
    # restore, then the donor's counter going on, on the explored curve from t = 10.
    records = step_records(experiment / name)
    assert sorted(records) == list(range(1, 16))
    value = {s: r["schedule"]["gradient_norm_threshold"][0] for s, r in records.items()}
    for step in range(1, restored + 1):
        assert value[step] == pytest.approx(threshold_curve(old)(step - 1), rel=1e-12)
    for step in range(restored + 1, 16):
        assert value[step] == pytest.approx(threshold_curve(new)(step - 1), rel=1e-12)
    assert threshold_curve(new)(restored) != pytest.approx(threshold_curve(donor_value)(restored))


@pytest.mark.slow
def test_crashed_trial_resumes_from_its_checkpoint(
    workdir: Path, grid_sweep: subprocess.CompletedProcess[str]
) -> None:
    """The grid's trial killed once after step 10 restarts from its step-10 checkpoint
    (max_failures 1); its reported steps are continuous and the sweep finishes."""
    proc = grid_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (workdir / "grid.fault").is_file(), "the fault never fired"
    experiment = workdir / "runs" / "grid"
    rows = trial_rows(experiment)
    crashed = [name for name in rows if (experiment / name / "error.txt").exists()]
    assert crashed, "no trial records the crash"
    for name in crashed:
        trial = rows[name]
        warmup = trial[0]["config"][WARMUP]
        assert [r["global_step"] for r in trial] == [5, 10, 15]
        for r in trial:
            assert r["schedule/lr/pg0"] == pytest.approx(
                LR * lr_curve(warmup)(r["global_step"] - 1), rel=1e-12
            )
        assert "The actor died unexpectedly" in (experiment / name / "error.txt").read_text()
        records = step_records(experiment / name)
        assert sorted(records) == list(range(1, 16))


@pytest.mark.slow
def test_asha_on_tokens_compares_trials_at_equal_tokens(workdir: Path, ray_head: str) -> None:
    """Two logical batch sizes (2 and 8 rows per step) under ASHA with time_attr
    clock/tokens: both report every 360 tokens, at different optimizer steps, and the
    big-batch trial is stopped at the 720-token rung, where ASHA compared it with the
    small-batch trial at 720 tokens (step 6 against about step 20)."""
    path = write_sweep(
        workdir,
        "asha_tokens",
        set={
            **TOKENS,
            "schedules.lr": token_lr(1800),
        },
        search={"train.micro_batch_size": {"grid": [2, 8]}},
        tune={
            "scheduler": "asha",
            "time_attr": "clock/tokens",
            "asha": {"grace_period": 720, "reduction_factor": 2},  # rungs at 720, 1440
            "max_concurrent_trials": 1,  # the big batch reaches the rung second
        },
    )
    proc = cli("tune", str(path), "--address", ray_head, env=HEAD_AUTH)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(clock/tokens " in proc.stdout  # the best trial's line gives its reading
    experiment = workdir / "runs" / "asha_tokens"
    by_batch = {
        r[0]["config"]["train.micro_batch_size"]: n for n, r in trial_rows(experiment).items()
    }
    rows = {batch: trial_rows(experiment)[name] for batch, name in by_batch.items()}
    small, big = rows[2], rows[8]
    for batch, trial in rows.items():
        records = step_records(experiment / by_batch[batch])
        for r in trial:
            # Each report is for a multiple of 360 tokens, made at the first step whose
            # reading crossed it, and carries the clock as it was.
            milestone, step = r["report/tokens"], r["global_step"]
            assert milestone % 360 == 0 and r["clock/tokens"] >= milestone
            assert records[step]["clock"]["tokens"] == r["clock/tokens"]
            assert step == 1 or records[step - 1]["clock"]["tokens"] < milestone
            assert r["clock/samples"] == batch * step == batch * r["clock/steps"]
    assert [r["report/tokens"] for r in small] == [360, 720, 1080, 1440, 1800]
    # The big batch stopped at the 720-token rung, long before its 1800-token budget:
    # it was worse there than the small batch had been at 720 tokens.
    assert [r["report/tokens"] for r in big] == [360, 720]
    at_rung = {b: next(r for r in t if r["report/tokens"] == 720) for b, t in rows.items()}
    assert at_rung[8]["eval/loss"] > at_rung[2]["eval/loss"]
    # Equal tokens, unequal steps: about four times the steps for a quarter of the batch.
    assert at_rung[2]["global_step"] >= 3 * at_rung[8]["global_step"]


@pytest.mark.slow
def test_pbt_on_tokens_perturbs_at_equal_tokens(workdir: Path, ray_head: str) -> None:
    """PBT with time_attr clock/tokens: the 2-row and the 8-row trial both pause at
    their first report past 720 tokens (different optimizer steps), and the exploited
    trial goes on from the donor's checkpoint: the donor's clock and batch size. Counted
    in steps, a 1440-token run would never reach a 720 interval."""
    path_key = "schedules.lr.warmup_to_value"
    path = write_sweep(
        workdir,
        "pbt_tokens",
        set={
            **TOKENS,
            "train.tokens": 1440,
            "schedules.lr": token_lr(1440),
        },
        search={"train.micro_batch_size": {"grid": [2, 8]}},
        tune={
            "scheduler": "pbt",
            "time_attr": "clock/tokens",
            "pbt": {
                "perturbation_interval": 720,
                "quantile_fraction": 0.5,
                "resample_probability": 0.0,
                "synch": True,
                "mutations": {path_key: {"uniform": [0.5, 2.0]}},
            },
        },
    )
    proc = cli("tune", str(path), "--address", ray_head, env=HEAD_AUTH, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    experiment = workdir / "runs" / "pbt_tokens"
    rows = trial_rows(experiment)
    assert len(rows) == 2
    at_720 = {}
    for name, trial in rows.items():
        reported = [r["report/tokens"] for r in trial]
        assert reported[:2] == [360, 720] and all(t % 360 == 0 for t in reported)
        at_720[name] = trial[1]
    batch = {n: r["config"]["train.micro_batch_size"] for n, r in at_720.items()}
    assert sorted(batch.values()) == [2, 8]
    small, big = sorted(at_720, key=batch.get)
    # Equal tokens at the perturbation, unequal steps.
    assert at_720[small]["global_step"] >= 3 * at_720[big]["global_step"]
    exploits = [
        json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()
    ]
    assert exploits, "no trial was exploited at the 720-token interval"
    target_tag, donor_tag = exploits[0][:2]
    (target,) = [n for n in rows if f"_{target_tag}_" in n]
    (donor,) = [n for n in rows if f"_{donor_tag}_" in n]
    donor_batch, restored = batch[donor], at_720[donor]["global_step"]
    # What each trial ran after the perturbation is read from the job's own per-step
    # records: Ray's result.json of a paused and resumed trial can lose the rows after
    # its last sync to the experiment folder (progress.csv kept them in one such run).
    donor_records = step_records(experiment / donor)
    assert max(r["clock"]["tokens"] for r in donor_records.values()) >= 1440  # its budget
    # After the restore the target runs the donor's batch size from the donor's clock.
    records = step_records(experiment / target)
    after = [records[s] for s in sorted(records) if s > restored]
    assert after, "the exploited trial ran nothing after the restore"
    assert all(r["clock"]["samples"] == donor_batch * r["clock"]["steps"] for r in after)
    assert max(r["clock"]["tokens"] for r in after) >= 1440
    assert records[restored + 1]["clock"]["steps"] == restored + 1


@pytest.mark.slow
def test_multi_worker_trials_run_as_ddp_jobs(workdir: Path, ray_head: str) -> None:
    """workers: 2 runs each trial as a 2-process TorchTrainer job; rank 0 reports."""
    path = write_sweep(
        workdir,
        "ddp",
        set={"train.steps": 10, "schedules.lr.num_training_steps": 10},
        search={"schedules.lr.num_warmup_steps": {"grid": [2]}},
        tune={"scheduler": "asha", "resources": {"workers": 2, "cpus": 0.5}},
    )
    proc = cli("tune", str(path), "--address", ray_head, env=HEAD_AUTH)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    experiment = workdir / "runs" / "ddp"
    ((name, trial),) = trial_rows(experiment).items()
    assert [r["global_step"] for r in trial] == [5, 10]
    curve = warmup_anneal_curve(
        warmup_to_value=1.0, anneal_to_value=0.1, num_warmup_steps=2, num_training_steps=10
    )
    for r in trial:
        assert r["schedule/lr/pg0"] == pytest.approx(LR * curve(r["global_step"] - 1), rel=1e-12)
    assert (experiment / name / "logs" / "metrics.jsonl").is_file()
    assert "world_size=2" in proc.stdout + proc.stderr
