"""The gradient noise scale of both controllers (``noise_scale=True``).

Invariant: on a problem whose per-item gradients are a known mean ``G`` plus noise of a
known covariance ``Σ`` (the loss is linear in the parameters, so every item's gradient
is its own input), the estimate after a few hundred logical batches is within a factor
1.5 of ``tr(Σ)/‖G‖²`` in the controller's items: in one process, under 2-rank DDP and
under FSDP2 (GNTS; LogicalBatchSize refuses it, naming why), for one extra collective
per optimizer step at most. The estimator's state resumes exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist_utils import count_collectives, run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from schedany.control import GradientNormThreshold, LogicalBatchSize

F64 = torch.float64
D = 128
MEAN = torch.full((D,), 1 / math.sqrt(D), dtype=F64)  # ‖G‖² = 1
STD = torch.linspace(0.5, 1.5, D, dtype=F64).mul(32 / D).sqrt()  # tr(Σ) = 32
TRUE_B = float(STD.square().sum() / MEAN.square().sum())
BATCHES = 300
RANK_BATCHES = 200  # fewer, and smaller, under 2 ranks: collectives are slow on a busy CPU
COUNTED = 20  # logical batches whose collectives are counted (with and without the estimate)


class Linear(nn.Module):
    """loss_i = θ·x_i, so item i's gradient is x_i: mean MEAN, covariance diag(STD²)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(D, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.theta


def items(n: int, generator: torch.Generator) -> torch.Tensor:
    return MEAN + STD * torch.randn(n, D, generator=generator, dtype=F64)


def make(model: nn.Module, target: float) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the gradient does not depend on θ
    opt.param_groups[0]["logical_batch_size"] = target
    opt.param_groups[0]["gradient_norm_threshold"] = 0.0  # GNTS: always max_accumulation
    return opt


def train(
    ctl: Any,
    opt: torch.optim.Optimizer,
    per_rank: int,
    per_item: bool,
    generator: torch.Generator,
    batches: int = BATCHES,
) -> list[float]:
    """``batches`` logical batches of micro-batches of ``per_rank`` items (a sum loss with
    num_items, else a mean); the noise scale after each (nan without one)."""
    seen: list[float] = []
    while len(seen) < batches:
        x = items(per_rank, generator)
        with ctl.accumulate(num_items=per_rank if per_item else None):
            out = ctl.model(x)
            (out.sum() if per_item else out.mean()).backward()
        if ctl.ready:
            opt.step()
            opt.zero_grad()
            seen.append(ctl.metrics().get("noise_scale", math.nan))
    return seen


def seed(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def close_to(value: float, truth: float) -> bool:
    return truth / 1.5 <= value <= truth * 1.5


# --- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per_item", "unit"),
    [
        ("LogicalBatchSize, num_items", True, 1.0),
        ("LogicalBatchSize, micro_batch_size", False, 1.0),
        ("GradientNormThreshold, num_items", True, 1.0),
        # Without num_items a GNTS item is one micro-step of 16 items.
        ("GradientNormThreshold, mean loss", False, 1 / 16),
    ],
)
def test_noise_scale_in_one_process(name: str, per_item: bool, unit: float) -> None:
    model = Linear()
    opt = make(model, 64)
    if name.startswith("LogicalBatchSize"):
        ctl = LogicalBatchSize(
            model, opt, micro_batch_size=None if per_item else 16, noise_scale=True
        )
    else:
        ctl = GradientNormThreshold(model, opt, max_accumulation_steps=4, noise_scale=True)
    seen = train(ctl, opt, 16, per_item, seed(0))
    assert math.isnan(seen[0]) is False and ctl.metrics()["micro_steps"] == 4
    assert close_to(seen[-1], TRUE_B * unit), (seen[-1], TRUE_B * unit)


def test_one_micro_step_per_batch_adds_nothing_in_one_process() -> None:
    model = Linear()
    opt = make(model, 16)
    ctl = LogicalBatchSize(model, opt, noise_scale=True)
    assert all(math.isnan(v) for v in train(ctl, opt, 16, True, seed(0), batches=20))


def test_noise_scale_state_resumes_exactly() -> None:
    def controller() -> tuple[LogicalBatchSize, torch.optim.Optimizer]:
        model = Linear()
        opt = make(model, 40)
        return LogicalBatchSize(model, opt, noise_scale=True, noise_scale_ema=0.9), opt

    whole, opt = controller()
    reference = train(whole, opt, 12, True, seed(3), batches=60)

    first, opt = controller()
    data = seed(3)
    head = train(first, opt, 12, True, data, batches=30)
    state = first.state_dict()
    assert set(state["noise_scale"]) == {"squared_norm", "trace", "updates"}
    again, opt = controller()
    again.load_state_dict(state)
    tail = train(again, opt, 12, True, data, batches=30)  # the same data stream, on
    assert head + tail == reference

    plain, _ = controller()
    plain_state = LogicalBatchSize(Linear(), make(Linear(), 1)).state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['noise_scale'\]"):
        plain.load_state_dict(plain_state)


def test_bad_noise_scale_arguments() -> None:
    model = Linear()
    opt = make(model, 64)
    with pytest.raises(TypeError, match=r"noise_scale must be a bool, got 'yes'"):
        LogicalBatchSize(model, opt, noise_scale="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"noise_scale_ema to be a finite number >= 0.0 and < 1"):
        GradientNormThreshold(model, opt, noise_scale=True, noise_scale_ema=1.0)
    with pytest.raises(TypeError, match=r"noise_scale_ema"):
        GradientNormThreshold(model, opt, noise_scale=True, noise_scale_ema="0.9")
    assert "noise_scale" not in LogicalBatchSize(model, opt).metrics()


# --- two ranks -----------------------------------------------------------------------------


def _ddp(model: nn.Module, baseline_hook: bool) -> DDP:
    wrapped = DDP(model)
    if baseline_hook:  # the hook noise_scale wraps, so both runs' gradient syncs count alike
        wrapped.register_comm_hook(None, default_hooks.allreduce_hook)
    return wrapped


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model


def _scenario(rank: int, kind: str, controller: str, per_item: bool, noise: bool) -> dict:
    """``RANK_BATCHES`` logical batches of 2 micro-steps of 16 items over the ranks: the
    collectives of the first ``COUNTED`` (with and without the estimate), and the
    estimate after the last."""
    torch.manual_seed(0)
    model = Linear()
    model = _fsdp(model) if kind == "fsdp" else _ddp(model, baseline_hook=not noise)
    opt = make(model, 32)
    per_rank = (12, 4)[rank] if per_item else 8  # uneven small batches with num_items
    if controller == "lbs":
        ctl: Any = LogicalBatchSize(
            model, opt, micro_batch_size=None if per_item else 8, noise_scale=noise
        )
    else:
        ctl = GradientNormThreshold(model, opt, max_accumulation_steps=2, noise_scale=noise)
    generator = seed(100 + rank)
    with count_collectives() as counts:
        seen = train(ctl, opt, per_rank, per_item, generator, batches=COUNTED)
    if noise:
        seen += train(ctl, opt, per_rank, per_item, generator, batches=RANK_BATCHES - COUNTED)
    return {"last": seen[-1], "collectives": sum(counts.values())}


SCENARIOS = [
    ("ddp", "lbs", True),  # rank 0 has 12 items per micro-step, rank 1 has 4
    ("ddp", "lbs", False),  # micro_batch_size=8: no collective at all without the estimate
    ("ddp", "gnts", True),
    ("fsdp", "gnts", True),
]


def _job(rank: int, world_size: int) -> dict:
    out: dict[str, Any] = {}
    for kind, controller, per_item in SCENARIOS:
        with_noise = _scenario(rank, kind, controller, per_item, noise=True)
        without = _scenario(rank, kind, controller, per_item, noise=False)
        out[(kind, controller, per_item)] = (with_noise, without)
    try:
        model = _fsdp(Linear())
        LogicalBatchSize(model, make(model, 64), noise_scale=True)
    except ValueError as exc:
        out["fsdp lbs"] = str(exc)
    model = DDP(Linear())
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    try:
        GradientNormThreshold(model, make(model, 64), noise_scale=True)
    except ValueError as exc:
        out["hooked"] = str(exc)
    # A controller rebuilt on the same model (a Tune restore) takes schedany's hook over.
    model = DDP(Linear())
    opt = make(model, 32)
    GradientNormThreshold(model, opt, max_accumulation_steps=2, noise_scale=True)
    again = GradientNormThreshold(model, opt, max_accumulation_steps=2, noise_scale=True)
    out["rebuilt"] = train(again, opt, 8, True, seed(7 + rank), batches=COUNTED)[-1]
    return out


@pytest.mark.slow
def test_noise_scale_under_ddp_and_fsdp2() -> None:
    results = run_ranks(_job, deadline_s=240)
    for scenario in SCENARIOS:
        (noisy0, plain0), (noisy1, _) = results[0][scenario], results[1][scenario]
        assert noisy0["last"] == noisy1["last"], scenario  # one estimate, on every rank
        assert close_to(noisy0["last"], TRUE_B), (scenario, noisy0["last"], TRUE_B)
        # DDP: one all-reduce of the ranks' small-batch norms per optimizer step; FSDP2
        # (GNTS): none, its all-gather already carries the first micro-step's norm.
        extra = noisy0["collectives"] - plain0["collectives"]
        assert extra == (COUNTED if scenario[0] == "ddp" else 0), (scenario, extra)
    message = results[0]["fsdp lbs"]
    assert "does not support a sharded (FSDP2) model" in message
    assert "synchronizes gradients only on a logical batch's last micro-step" in message
    assert "comm hook already" in results[0]["hooked"]
    assert math.isfinite(results[0]["rebuilt"]) and results[0]["rebuilt"] > 0


# --- the example job -----------------------------------------------------------------------


def test_example_logs_the_noise_scale_next_to_the_logical_batch_size(tmp_path) -> None:
    from _job_runs import EXAMPLES, TINY_MODEL
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    from schedany.config import load_config
    from schedany.job import train as train_job

    config = load_config(
        EXAMPLES / "noise_scale.yaml",
        [
            *TINY_MODEL,
            "train.micro_batch_size=4",
            "train.steps=5",
            "train.eval_every=0",
            "train.progress=none",
            "extend.logical_batch_size=300",  # tokens: a few micro-steps of the tiny model
            f"train.log_dir={tmp_path / 'logs'}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        ],
    )
    train_job(config)
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={SCALARS: 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    noise = scalars["control/noise_scale"]
    for group in ("decay", "no_decay"):
        size = scalars[f"schedule/logical_batch_size/{group}"]
        assert [step for step, _ in size] == [step for step, _ in noise] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(value) and value > 0 for _, value in noise)
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    assert [value for _, value in noise] == pytest.approx(
        [line["control"]["noise_scale"] for line in logged], rel=1e-6
    )
    assert {"guard/clip_coef", "guard/grad_norm", "guard/skipped_steps"} <= scalars.keys()
