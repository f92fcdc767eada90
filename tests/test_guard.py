"""GradientGuard: scheduled per-group clipping and spike skipping, library and job.

Invariants:
- clipping a param group is ``torch.nn.utils.clip_grad_norm_`` on that group; groups
  without the key are untouched; under 2-rank DDP and FSDP2 the clipped gradients equal
  one process computing the whole batch (one all-gather under FSDP2, none under DDP);
- a step is skipped iff the global norm exceeds the threshold, on every rank alike;
- bad keys and values are errors naming them, and change nothing;
- in the job a skipped step is not an optimizer step (steps and schedules do not advance)
  but its data is counted; 20 in a row stop the run; ``guard:`` works with every
  ``control.kind`` and resumes exactly.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist_utils import count_collectives, run_ranks
from _job_runs import EXAMPLES, TINY_MODEL
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from schedany import GradientGuard
from schedany.config import ConfigError, load_config
from schedany.job.trainer import train

F64 = torch.float64
CLIP = "gradient_clip_threshold"
SKIP = "gradient_skip_threshold"


# --- one process -----------------------------------------------------------------------


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1)
    ).to(F64)


def make_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    return x, 5 * x.sum(1, keepdim=True).sin() + torch.randn(n, 1, generator=g, dtype=F64)


def make_optimizer(model: nn.Module, clip: tuple[float | None, ...]) -> torch.optim.Optimizer:
    """One param group per Linear; ``clip[i]`` is group i's CLIP value (None: no key)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    groups = []
    for linear, value in zip(linears, clip, strict=True):
        group: dict[str, Any] = {"params": list(linear.parameters())}
        if value is not None:
            group[CLIP] = value
        groups.append(group)
    return torch.optim.SGD(groups, lr=0.1)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    (model(x) - y).pow(2).mean().backward()


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


CLIPS = (0.05, 1e3, None)  # group 0 is clipped, group 1 is under its norm, group 2 has no key


def reference_clip(model: nn.Module, clip: tuple[float | None, ...]) -> float:
    """torch's clip_grad_norm_ per group that holds the key; returns the total norm."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    for linear, value in zip(linears, clip, strict=True):
        if value is not None:
            torch.nn.utils.clip_grad_norm_(linear.parameters(), value)
    return float(total)


def test_clipping_is_clip_grad_norm_per_group() -> None:
    x, y = make_batch()
    model, expected = make_model(), make_model()
    opt = make_optimizer(model, CLIPS)
    guard = GradientGuard(opt, clip_key=CLIP, model=model)
    backward(model, x, y)
    backward(expected, x, y)
    before = grads(model)
    total = reference_clip(expected, CLIPS)
    assert guard.apply() is True
    after, want = grads(model), grads(expected)
    for got, ref in zip(after, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    assert not torch.equal(after[0], before[0])  # group 0 was clipped ...
    for i in (2, 3, 4, 5):  # ... groups 1 (under its norm) and 2 (no key) are bit for bit
        assert torch.equal(after[i], before[i])
    metrics = guard.metrics()
    assert metrics["grad_norm"] == pytest.approx(total, rel=1e-12)
    group0 = torch.nn.utils.get_total_norm(before[:2])
    assert metrics["clip_coef"] == pytest.approx(0.05 / (float(group0) + 1e-6), rel=1e-12)
    assert metrics["skipped_steps"] == 0.0


def test_skipping_zeroes_the_gradients_and_counts() -> None:
    x, y = make_batch()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0][SKIP] = 1e6
    guard = GradientGuard(opt, skip_key=SKIP)
    backward(model, x, y)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert guard.apply() is True and all(p.grad is not None for p in model.parameters())
    opt.param_groups[0][SKIP] = norm * 0.999
    assert guard.apply() is False
    assert all(p.grad is None for p in model.parameters())
    assert guard.metrics() == {
        "grad_norm": pytest.approx(norm),
        "clip_coef": 1.0,
        "skipped_steps": 1.0,
    }
    backward(model, x, y)
    next(model.parameters()).grad[0, 0] = math.nan  # a non-finite norm is skipped too
    assert guard.apply() is False and guard.metrics()["skipped_steps"] == 2.0

    state = guard.state_dict()
    fresh = GradientGuard(opt, skip_key=SKIP)
    fresh.load_state_dict(state)
    assert fresh.metrics()["skipped_steps"] == 2.0
    with pytest.raises(KeyError, match=r"unknown keys \['extra'\]"):
        fresh.load_state_dict({**state, "extra": 1})


def test_bad_input_names_the_key_and_the_value_and_changes_nothing() -> None:
    model = make_model()
    opt = make_optimizer(model, CLIPS)
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(
        KeyError,
        match=r"key='gradient_clip_treshold' is in no optimizer param group.*"
        r"did you mean 'gradient_clip_threshold'",
    ):
        GradientGuard(opt, clip_key="gradient_clip_treshold")
    opt.param_groups[1][CLIP] = "big"
    with pytest.raises(
        TypeError,
        match=r"param_groups\[1\]\['gradient_clip_threshold'\] must be a real number, got 'big'",
    ):
        GradientGuard(opt, clip_key=CLIP)
    opt.param_groups[1][CLIP] = True
    with pytest.raises(TypeError, match=r"must be a real number, got True"):
        GradientGuard(opt, clip_key=CLIP)
    opt.param_groups[1][CLIP] = -1.0
    with pytest.raises(
        ValueError,
        match=r"param_groups\[1\]\['gradient_clip_threshold'\] must be a number >= 0, got -1.0",
    ):
        GradientGuard(opt, clip_key=CLIP)
    opt.param_groups[1][CLIP] = math.nan
    with pytest.raises(ValueError, match=r"must be a number >= 0, got nan"):
        GradientGuard(opt, skip_key=CLIP)
    opt.param_groups[1][CLIP] = 1e3
    assert opt.state_dict() == saved  # nothing written into the optimizer

    with pytest.raises(TypeError, match=r"clip_key must be a non-empty str or None, got 3"):
        GradientGuard(opt, clip_key=3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"optimizer must be a torch.optim.Optimizer, got Sequential"
    ):
        GradientGuard(model, clip_key=CLIP)  # type: ignore[arg-type]
    # A model the optimizer was not built on: the guard would measure the wrong gradients.
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 3\)\) is not a parameter "
        r"of model \(Linear\)",
    ):
        GradientGuard(opt, clip_key=CLIP, model=nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .* got str"):
        GradientGuard(opt, clip_key=CLIP, model="model")  # type: ignore[arg-type]

    # A schedule that drives the threshold negative: apply() raises before any change.
    guard = GradientGuard(opt, clip_key=CLIP, model=model)
    backward(model, *make_batch())
    before = grads(model)
    opt.param_groups[0][CLIP] = -0.5
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\]\['gradient_clip_threshold'\] must be a number >= 0, got -0.5",
    ):
        guard.apply()
    assert all(torch.equal(a, b) for a, b in zip(grads(model), before, strict=True))


# --- two ranks ---------------------------------------------------------------------------


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for linear in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        fully_shard(linear, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_grads(model: nn.Module) -> list[torch.Tensor]:
    return [
        (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        for p in model.parameters()
    ]


def _local_norm(model: nn.Module) -> float:
    """This rank's own share of the norm (its shards): what a naive guard would use."""
    local = [
        p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()
    ]
    return float(torch.nn.utils.get_total_norm(local))


def _guard_job(rank: int, world_size: int) -> dict[str, Any]:
    x, y = make_batch(n=8)
    mine = slice(4 * rank, 4 * rank + 4)  # each rank half of the batch; mean losses
    out: dict[str, Any] = {}
    for kind in ("ddp", "fsdp"):
        base = make_model()
        model = DDP(base) if kind == "ddp" else _fsdp(base)
        opt = make_optimizer(model if kind == "fsdp" else base, CLIPS)
        guard = GradientGuard(opt, clip_key=CLIP, model=model)
        backward(model, x[mine], y[mine])
        with count_collectives() as counts:
            passed = guard.apply()
        out[kind] = {
            "passed": passed,
            "grads": _full_grads(model),
            "metrics": guard.metrics(),
            "collectives": dict(counts),
        }
        # Skip: a threshold just under the global norm, over every rank's own shard norm.
        for p in opt.param_groups:
            p[SKIP] = 0.0
        backward(model, x[mine], y[mine])
        local = torch.tensor([_local_norm(model)], dtype=F64)
        both = [torch.zeros(1, dtype=F64) for _ in range(world_size)]
        dist.all_gather(both, local)
        norm = float(torch.nn.utils.get_total_norm(_full_grads(model)))  # the global norm
        # DDP: every rank's norm is the global one; FSDP2: each rank's shard is under it.
        threshold = 0.999 * norm if kind == "ddp" else (max(float(t) for t in both) + norm) / 2
        opt.param_groups[0][SKIP] = threshold
        skipper = GradientGuard(opt, skip_key=SKIP, model=model)
        out[kind]["locals"] = [float(t) for t in both]
        out[kind]["threshold"] = threshold
        out[kind]["skipped"] = not skipper.apply()
        out[kind]["grads_after_skip"] = [p.grad is None for p in model.parameters()]
    plain = make_model()
    try:
        GradientGuard(torch.optim.SGD(plain.parameters(), lr=0.1), model=plain)
    except ValueError as exc:
        out["plain"] = str(exc)
    return out


@pytest.mark.slow
def test_clipping_and_skipping_under_ddp_and_fsdp2_equal_one_process() -> None:
    x, y = make_batch(n=8)
    expected = make_model()
    backward(expected, x, y)
    total = reference_clip(expected, CLIPS)
    want = grads(expected)
    results = run_ranks(_guard_job, deadline_s=120)
    for kind in ("ddp", "fsdp"):
        for rank in (0, 1):
            got = results[rank][kind]
            assert got["passed"] is True
            for a, b in zip(got["grads"], want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
            assert got["metrics"]["grad_norm"] == pytest.approx(total, rel=1e-10)
            # The skip decision is the global norm's, on both ranks, though each rank's
            # own shard is under the threshold (under FSDP2).
            assert got["skipped"] is True and all(got["grads_after_skip"])
        assert results[0][kind]["metrics"] == results[1][kind]["metrics"]
    assert results[0]["ddp"]["collectives"] == {}  # DDP's gradients are the same everywhere
    assert sum(results[0]["fsdp"]["collectives"].values()) == 1  # one all-gather of the shares
    assert max(results[0]["fsdp"]["locals"]) < results[0]["fsdp"]["threshold"]
    assert "model is a plain Sequential while 2 ranks run" in results[0]["plain"]
    assert "DistributedDataParallel or fully_shard" in results[0]["plain"]


# --- the job -------------------------------------------------------------------------------

BASELINE = str(EXAMPLES / "baseline.yaml")
JOB = [
    *TINY_MODEL,
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.progress=none",
    "train.log_every=100",
]


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def without_losses(line: dict) -> dict:
    """A record without its losses (the report windows differ when a run is resumed)."""
    return {k: v for k, v in line.items() if k not in ("train/loss", "eval/loss")}


def job(tmp: Path, name: str, *overrides: str, config: str = BASELINE) -> list[dict]:
    run = tmp / name
    settings = [*JOB, f"train.log_dir={run / 'logs'}", f"train.checkpoint_dir={run / 'ckpt'}"]
    train(load_config(config, [*settings, *overrides]))
    return lines(run)


def test_a_skipped_step_consumes_data_but_is_no_optimizer_step(tmp_path: Path) -> None:
    measure = [f"extend.{CLIP}=1.0e9", f"guard.clip_key={CLIP}"]  # never clips: measures
    free = job(tmp_path, "free", *measure, "train.steps=24")
    norms = [line["guard"]["grad_norm"] for line in free]
    threshold = statistics.median(norms[:12])
    skipping = job(
        tmp_path, "skip", f"extend.{SKIP}={threshold}", f"guard.skip_key={SKIP}", "train.steps=8"
    )
    assert [line["step"] for line in skipping] == list(range(1, 9))
    assert skipping[-1]["guard"]["skipped_steps"] > 0
    micro = 0
    for line, reference in zip(skipping, free, strict=False):
        micro += line["micro_steps"]  # a skipped step's micro-batch is re-drawn in the same step
        assert line["guard"]["grad_norm"] <= threshold
        assert line["clock"]["steps"] == line["step"]  # a skipped step is no step ...
        assert line["schedule"] == reference["schedule"]  # ... and the schedules did not move
        assert line["clock"]["samples"] == 4 * micro  # but its data was consumed ...
        assert line["clock"]["tokens"] == free[micro - 1]["clock"]["tokens"]  # ... all of it
    skipped = skipping[-1]["guard"]["skipped_steps"]
    assert skipped == sum(line["micro_steps"] - 1 for line in skipping)


def test_twenty_skips_in_a_row_stop_the_run(tmp_path: Path) -> None:
    with pytest.raises(
        FloatingPointError,
        match=r"^20 optimizer steps in a row were skipped \(gradient norm > "
        r"'gradient_skip_threshold'\) at optimizer step 1; training diverged",
    ):
        job(tmp_path, "stuck", f"extend.{SKIP}=0.0", f"guard.skip_key={SKIP}", "train.steps=4")


@pytest.mark.parametrize("kind", ["none", "logical_batch", "gnts"])
def test_guard_composes_with_every_control_kind_and_resumes_exactly(
    tmp_path: Path, kind: str
) -> None:
    guard = [
        f"extend.{CLIP}=0.5",
        f"extend.{SKIP}=1.0e9",
        f"guard.clip_key={CLIP}",
        f"guard.skip_key={SKIP}",
        f"schedules.{CLIP}={{curve: linear_schedule_with_warmup, warmup_to_value: 1.0, "
        "anneal_to_value: 0.2, num_warmup_steps: 0, num_training_steps: 4}",
    ]
    control = {
        "none": [],
        "logical_batch": [
            "control.kind=logical_batch",
            "extend.logical_batch_size=200",
            "control.noise_scale=true",
        ],
        "gnts": [
            "control.kind=gnts",
            "extend.gradient_norm_threshold=0.5",
            "control.max_accumulation_steps=3",
            "control.noise_scale=true",
        ],
    }[kind]
    whole = job(tmp_path, "whole", *guard, *control, "train.steps=4")
    assert [line["step"] for line in whole] == list(range(1, 5))
    coefs = [line["guard"]["clip_coef"] for line in whole]
    assert min(coefs) < 1.0 and all(0 < c <= 1.0 for c in coefs)  # clipped, by the schedule
    assert [line["schedule"][CLIP][0] for line in whole] == pytest.approx(
        [0.5 * (1 - 0.8 * t / 4) for t in range(4)]
    )
    if kind != "none":
        assert math.isfinite(whole[-1]["control"]["noise_scale"])
    # Half the run, then the rest from its checkpoint in a fresh trainer: the same records.
    job(tmp_path, "halves", *guard, *control, "train.steps=2")
    resumed = job(tmp_path, "halves", *guard, *control, "train.steps=4")
    assert [without_losses(line) for line in resumed] == [without_losses(line) for line in whole]


def test_guard_config_errors_name_the_path(tmp_path: Path) -> None:
    def parse(*overrides: str) -> None:
        load_config(BASELINE, [*JOB, *overrides])

    with pytest.raises(
        ConfigError,
        match=r"guard.clip_key: optimizer key 'gradient_clip_threshold' is neither an "
        r"optimizer argument nor in extend",
    ):
        parse(f"guard.clip_key={CLIP}")
    with pytest.raises(
        ConfigError,
        match=r"guard.skip_key: extend.gradient_skip_threshold is -1.0; a gradient norm "
        r"bound must be >= 0",
    ):
        parse(f"extend.{SKIP}=-1.0", f"guard.skip_key={SKIP}")
    with pytest.raises(
        ConfigError, match=r"guard.skip_key: optimizer.betas is a list \[0.9, 0.95\], not a number"
    ):
        parse("guard.skip_key=betas")
    with pytest.raises(ConfigError, match=r"guard.clip_key: expected"):
        parse("guard.clip_key=3")
    with pytest.raises(
        ConfigError, match=r"guard.clip: unknown field \(did you mean 'clip_key'\?\)"
    ):
        parse("guard.clip=1.0")
    with pytest.raises(ConfigError, match=r"control.noise_scale: needs a controller"):
        parse("control.noise_scale=true")
    with pytest.raises(ConfigError, match=r"control.noise_scale_ema"):
        parse(
            "control.kind=logical_batch",
            "extend.logical_batch_size=64",
            "control.noise_scale_ema=1.5",
        )


@pytest.mark.slow
def test_torchrun_ddp_with_guard_and_noise_scale(tmp_path: Path) -> None:
    """Two ranks: skips agree (no rank waits in a collective the other skipped), a step's
    skipped logical batches count in the clock, and the noise scale comes from the ranks.

    Skips need a threshold inside the spread of the gradient norms, which fall as the
    model learns: the threshold is 20x higher for the first steps (an inverse warmup),
    then the 30th percentile of a one-process run's norms (a logical batch counts tokens
    over all ranks, so one process sees the same norms)."""
    from _job_runs import launch, ok, run_args, sets

    settings = [*JOB, "train.steps=8", "extend.logical_batch_size=300"]
    config = str(EXAMPLES / "noise_scale.yaml")
    never = [f"extend.{SKIP}=1.0e9", f"guard.skip_key={SKIP}"]
    free = job(tmp_path, "one", *settings, *never, config=config)
    norms = sorted(line["guard"]["grad_norm"] for line in free[4:])
    schedule = (
        f"schedules.{SKIP}={{curve: constant_with_inverse_warmup, warmup_to_value: 1.0, "
        "num_warmup_steps: 4, warmup_multiplier: 20.0}"
    )
    run = tmp_path / "ddp"
    overrides = [
        *settings,
        f"extend.{SKIP}={norms[len(norms) * 3 // 10]}",
        f"guard.skip_key={SKIP}",
        schedule,
        "distributed.strategy=ddp",
    ]
    argv = ["train", config, *sets(overrides), *run_args(run)]
    ok(launch(argv, torchrun=["--nproc-per-node", "2"]))
    seen = lines(run)
    assert [line["step"] for line in seen] == list(range(1, 9))
    assert all(math.isfinite(line["control"]["noise_scale"]) for line in seen)
    micro = [line["micro_steps"] for line in seen]
    assert [line["clock"]["samples"] for line in seen] == [
        2 * 4 * sum(micro[: i + 1]) for i in range(len(micro))
    ]
    skips = [line["guard"]["skipped_steps"] for line in seen]
    assert skips[-1] > 0, skips
    for i, line in enumerate(seen):
        tokens = line["clock"]["tokens"] - (seen[i - 1]["clock"]["tokens"] if i else 0)
        skipped = skips[i] > (skips[i - 1] if i else 0)
        # A step's tokens are its stepped logical batch's, plus those of the ones skipped.
        assert (
            (tokens > line["control"]["items"]) if skipped else tokens == line["control"]["items"]
        )
