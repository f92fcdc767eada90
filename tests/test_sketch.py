"""Sketched GNTS: ``GradientNormThreshold(norm="sketch")``.

Invariant: the sketch is the CountSketch its docstring defines (linear, unbiased, relative
standard deviation at most sqrt(2/m), scratch memory bounded by m and one chunk); one
process decides exactly as ``norm="exact"``; on 2 DDP ranks every rank takes the same
decision, the decisions are exact GNTS's on all but knife-edge micro-steps, the gradients
are all-reduced once per optimizer step, and ``.grad`` when ready is the exact mean.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist_utils import count_collectives, run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

from schedany.config import ConfigError, parse_config
from schedany.control import GradientNormThreshold, _sketch
from schedany.control._sketch import _Hashes, count_sketch
from schedany.job import build_controller, build_run

# --- the sketch itself ---------------------------------------------------------------------


def sketch_by_definition(
    grads: list[torch.Tensor | None], numels: list[int], size: int, seed: int
) -> torch.Tensor:
    """Element by element, as the module docstring defines it: block p's element a goes to
    bucket (a + H_p) mod m with sign (-1)^(c_p + popcount(a & v_p))."""
    hashes = _Hashes(size, seed, torch.device("cpu"), torch.float64)
    out = [0.0] * size
    for grad, numel in zip(grads, numels):
        values = None if grad is None else grad.reshape(-1).tolist()
        for start in range(0, numel, size):
            v_lo, v_hi, c, shift = hashes.take(1)[:, 0].tolist()  # one block at a time
            v = v_hi * hashes.lo + v_lo
            for a in range(min(size, numel - start)):
                if values is not None:
                    sign = (-1) ** (c + bin(a & v).count("1"))
                    out[(a + shift) % size] += sign * values[start + a]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("size", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("vectorized", [False, True], ids=["blocks", "index_add"])
def test_the_sketch_is_its_definition(
    size: int, vectorized: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sketch, "_CHUNK", 128)  # several draws of block hashes per tensor
    g = torch.Generator().manual_seed(size)
    grads: list[torch.Tensor | None] = [
        torch.randn(3, 70, generator=g),
        None,  # a missing gradient still uses up its blocks' hashes
        torch.randn(5, generator=g),
        torch.randn(1, generator=g, dtype=torch.float64),
        torch.randn(400, generator=g),
    ]
    numels = [210, 9, 5, 1, 400]
    got = count_sketch(grads, numels, size, seed=11, vectorized=vectorized)
    assert got.dtype == torch.float64 and got.shape == (size,)
    torch.testing.assert_close(got, sketch_by_definition(grads, numels, size, 11))


def test_the_sketch_is_linear_and_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)

    def sk(x: torch.Tensor, seed: int = 3) -> torch.Tensor:
        return count_sketch([x], [x.numel()], 256, seed)

    # what lets ranks add their sketches: C(a) + C(b) = C(a + b)
    torch.testing.assert_close(sk(a) + sk(b), sk(a + b), rtol=1e-5, atol=1e-5)
    assert torch.equal(sk(a), sk(a))
    assert not torch.equal(sk(a), sk(a, seed=4))


STRUCTURES = {
    "gaussian": lambda g: torch.randn(4000, generator=g),
    "identical blocks": lambda g: torch.randn(256, generator=g).repeat(16),
    "constant": lambda g: torch.ones(4000),
    "rank-1 matrix": lambda g: torch.outer(torch.randn(32, generator=g), torch.randn(128)),
}


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_the_squared_norm_is_unbiased_with_relative_sd_at_most_sqrt_2_over_m(
    structure: str,
) -> None:
    size, draws = 256, 400
    x = STRUCTURES[structure](torch.Generator().manual_seed(1)).reshape(-1)
    exact = float(x.double().square().sum())
    errors = torch.tensor(
        [
            float(count_sketch([x], [x.numel()], size, seed).double().square().sum()) / exact - 1
            for seed in range(draws)
        ],
        dtype=torch.float64,
    )
    bound = math.sqrt(2 / size)
    assert abs(float(errors.mean())) < 4 * bound / math.sqrt(draws)  # unbiased
    assert float(errors.std()) < 1.15 * bound  # the sample sd of 400 draws is within ~4%
    assert float(errors.std()) > 0.5 * bound  # a sketch that errs, not a copy of the norm


@pytest.mark.parametrize("vectorized", [False, True], ids=["blocks", "index_add"])
def test_no_scratch_tensor_grows_with_the_model(
    vectorized: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sketch, "_CHUNK", 1 << 12)
    size, grad = 1024, torch.randn(300_000)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        count_sketch([grad, torch.randn(100)], [grad.numel(), 100], size, 0, vectorized=vectorized)
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    bound = 8 * (2 * size + _sketch._CHUNK)  # m floats (doubled) and one chunk of int64
    assert 0 < largest <= bound < grad.numel() * grad.element_size() / 20


# --- one process ---------------------------------------------------------------------------

F32 = torch.float32


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def make_batch(j: int, rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * j + rank)
    x = torch.randn(n, 32, generator=g)
    return x, x.sum(1, keepdim=True).sin() + 0.5 * torch.randn(n, 1, generator=g)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


def test_one_process_sketch_takes_the_exact_decisions() -> None:
    runs = {}
    for norm in ("exact", "sketch"):
        model = make_model()
        opt = make_optimizer(model)
        opt.param_groups[0]["gradient_norm_threshold"] = 0.9
        ctl = GradientNormThreshold(model, opt, max_accumulation_steps=5, norm=norm)
        trace = []
        for j in range(30):
            x, y = make_batch(j, 0, 8)
            with ctl.accumulate():
                nn.functional.mse_loss(model(x), y).backward()
            trace.append((ctl.ready, ctl.metrics()))
            if ctl.ready:
                opt.step()
                opt.zero_grad()
        runs[norm] = (trace, [p.detach().clone() for p in model.parameters()], ctl)
    assert runs["sketch"][0] == runs["exact"][0]  # decisions and every metric, bit for bit
    assert 0 < sum(ready for ready, _ in runs["exact"][0]) < 30
    for a, b in zip(runs["sketch"][1], runs["exact"][1]):
        assert torch.equal(a, b)
    assert runs["exact"][2].state_dict().keys() == {
        "controller",
        "mode",
        "optimizer_steps",
        "dropped_batches",
    }
    assert runs["sketch"][2].state_dict()["sketch_seed"] == 0


def test_bad_sketch_arguments_and_states_raise_clear_errors() -> None:
    model = make_model()
    opt = make_optimizer(model)
    opt.param_groups[0]["gradient_norm_threshold"] = 1.0
    with pytest.raises(ValueError, match=r"requires norm to be 'exact' or 'sketch', got norm='l1'"):
        GradientNormThreshold(model, opt, norm="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"requires sketch_size to be an integer >= 1, got.*=0"):
        GradientNormThreshold(model, opt, norm="sketch", sketch_size=0)
    with pytest.raises(TypeError, match=r"requires sketch_seed to be an integer >= 0"):
        GradientNormThreshold(model, opt, norm="sketch", sketch_seed=1.5)  # type: ignore[arg-type]
    exact = GradientNormThreshold(model, opt).state_dict()
    sketched = GradientNormThreshold(model, opt, norm="sketch", sketch_seed=5).state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['sketch_seed'\], which norm='sketch'"):
        GradientNormThreshold(model, opt, norm="sketch").load_state_dict(exact)
    with pytest.raises(KeyError, match=r"unknown keys \['sketch_seed'\]"):
        GradientNormThreshold(model, opt).load_state_dict(sketched)
    ctl = GradientNormThreshold(model, opt, norm="sketch")
    ctl.load_state_dict(sketched)
    assert ctl.state_dict() == sketched


# --- the config ----------------------------------------------------------------------------

GNTS_CONFIG = {
    "optimizer": {"name": "SGD", "lr": 0.1},
    "extend": {"gradient_norm_threshold": 1.0},
    "schedules": {
        "lr": {"curve": "constant_with_warmup", "warmup_to_value": 1.0, "num_warmup_steps": 0}
    },
    "seed": 3,
    "train": {"steps": 10},
}


def config_with(**control: Any) -> Any:
    return parse_config({**GNTS_CONFIG, "control": {"kind": "gnts", **control}})


def test_config_norm_and_sketch_size_reach_the_controller() -> None:
    assert config_with().control.norm == "exact"
    model = make_model()
    config = config_with(norm="sketch", sketch_size=4096)
    ctl = build_controller(config, model, build_run(config, model).optimizer)
    assert isinstance(ctl, GradientNormThreshold)
    assert (ctl.norm, ctl.sketch_size) == ("sketch", 4096)
    assert ctl.state_dict()["sketch_seed"] == 3  # the run's seed
    config = config_with(norm="sketch")
    ctl = build_controller(config, model, build_run(config, model).optimizer)
    assert isinstance(ctl, GradientNormThreshold) and ctl.sketch_size == 65536


@pytest.mark.parametrize(
    "control, message",
    [
        ({"norm": "l2"}, r"^control\.norm: expected one of exact, sketch, got 'l2'"),
        (
            {"norm": "sketch", "sketch_size": 0},
            r"^control\.sketch_size: expected an integer >= 1, got 0",
        ),
        ({"sketch_size": 1024}, r"^control\.sketch_size: only applies to norm sketch"),
        (
            {"kind": "logical_batch", "norm": "sketch"},
            r"^control\.norm: only applies to kind gnts, but kind is logical_batch",
        ),
    ],
)
def test_bad_sketch_config_is_a_config_error(control: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(
            {
                **GNTS_CONFIG,
                "extend": {"gradient_norm_threshold": 1.0, "logical_batch_size": 8},
                "control": {"kind": "gnts", **control},
            }
        )


# --- 2 DDP ranks ---------------------------------------------------------------------------

WORLD = 2
SIZE = 1024  # the sketch's m: relative sd of the squared norm <= sqrt(2/1024) = 4.4%
MICRO_BATCH = 8
MAX_ACCUMULATION = 6
# Steps that close at once (5.0), run to the limit (0.01), or cross in between.
THRESHOLDS = [5.0, 1.0, 0.01, 0.85, 5.0, 0.7, 0.01, 0.6, 5.0, 0.6, 0.5, 0.01]
ITEMS = [(5, 1), (3, 7), (1, 2), (6, 4), (2, 1), (4, 3), (1, 5)]  # per rank, uneven


class TableSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, table: list[float]) -> None:
        self.optimizer, self.table, self.t = optimizer, table, 0
        self._write()

    def _write(self) -> None:
        self.optimizer.param_groups[0]["gradient_norm_threshold"] = self.table[
            self.t % len(self.table)
        ]

    def step(self) -> None:
        self.t += 1
        self._write()


def counting_ddp() -> tuple[DDP, list[int]]:
    calls = [0]

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP reads annotations
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    model = DDP(make_model())
    model.register_comm_hook(None, counting_hook)
    return model, calls


def global_mean_norm(model: nn.Module, ctl: GradientNormThreshold, per_item: bool) -> float:
    """The exact ‖mean gradient‖ after this micro-step, whatever the controller did."""
    grads = [p.grad.detach() for p in model.parameters()]
    if ctl.ready:  # DDP has averaged them and the controller took the mean
        return float(torch.nn.utils.get_total_norm(grads))
    summed = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(summed)  # outside the controller and its counted collectives
    m = ctl.metrics()
    units = m["items"] if per_item else m["micro_steps"] * WORLD
    return float(summed.norm()) / units


def train(
    model: DDP,
    calls: list[int],
    ctl: GradientNormThreshold,
    rank: int,
    steps: int,
    *,
    per_item: bool = False,
    nan_at: int | None = None,
    j: int = 0,
    schedule_t: int = 0,
) -> dict[str, Any]:
    schedule = TableSchedule(ctl.optimizer, THRESHOLDS)
    schedule.t = schedule_t
    schedule._write()
    records = []
    while ctl.metrics()["optimizer_steps"] < steps:
        n = ITEMS[j % len(ITEMS)][rank] if per_item else MICRO_BATCH
        x, y = make_batch(j, rank, n)
        if j == nan_at and rank == 1:
            x = x * float("nan")
        before = calls[0]
        with count_collectives() as counted:
            with ctl.accumulate(num_items=n if per_item else None):
                err = (model(x) - y).pow(2)
                (err.sum() if per_item else err.mean()).backward()
        j += 1
        m = ctl.metrics()
        record = {
            "ready": ctl.ready,
            "threshold": m["threshold"],
            "micro_steps": m["micro_steps"],
            "estimate": m["grad_norm"],
            "grad_allreduces": calls[0] - before,
            "collectives": sum(counted.values()) - (calls[0] - before),  # less the hook's own
            "dropped": m["dropped_batches"],
        }
        if nan_at is None:
            record["exact"] = global_mean_norm(model, ctl, per_item)
        if ctl.ready:
            record["grads"] = [p.grad.detach().clone() for p in model.parameters()]
            ctl.optimizer.step()
            ctl.optimizer.zero_grad()
            schedule.step()
        elif nan_at is not None:
            record["grads_none"] = all(p.grad is None for p in model.parameters())
        records.append(record)
    return {"records": records, "params": [p.detach().clone() for p in model.parameters()]}


def controller(model: nn.Module, norm: str = "sketch", **kw: Any) -> GradientNormThreshold:
    opt = make_optimizer(model)
    opt.param_groups[0]["gradient_norm_threshold"] = THRESHOLDS[0]
    return GradientNormThreshold(
        model, opt, max_accumulation_steps=MAX_ACCUMULATION, norm=norm, sketch_size=SIZE, **kw
    )  # type: ignore[arg-type]


def refusals(rank: int) -> dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    try:
        controller(model)
    except ValueError as exc:
        out["fsdp2"] = str(exc)
    config = config_with(norm="sketch")
    try:
        build_controller(config, model, build_run(config, model).optimizer)
    except ConfigError as exc:
        out["fsdp2_config"] = str(exc)
    try:
        controller(DDP(make_model(), static_graph=True))
    except ValueError as exc:
        out["static_graph"] = str(exc)
    return out


def divergence(rank: int) -> dict[str, str]:
    def other_batch(ctl: GradientNormThreshold) -> None:
        if rank == 1:  # resumed from another checkpoint
            ctl.load_state_dict({**ctl.state_dict(), "optimizer_steps": 1})

    def other_target(ctl: GradientNormThreshold) -> None:
        ctl.optimizer.param_groups[0]["gradient_norm_threshold"] = 1.0 + rank

    out = {}
    for what, diverge in (("batch", other_batch), ("target", other_target)):
        ctl = controller(DDP(make_model()))
        diverge(ctl)
        try:
            with ctl.accumulate():
                loss = nn.functional.mse_loss(ctl.model(torch.ones(2, 32)), torch.ones(2, 1))
                loss.backward()
        except RuntimeError as exc:
            out[what] = str(exc)
    return out


def resume(rank: int) -> dict[str, Any]:
    """Stop after 3 steps and continue with a fresh model and controller from the state."""
    model, calls = counting_ddp()
    ctl = controller(model, sketch_seed=7)
    first = train(model, calls, ctl, rank, 3)
    state = {
        "model": model.module.state_dict(),
        "ctl": ctl.state_dict(),
        "j": len(first["records"]),
    }
    fresh, calls = counting_ddp()
    fresh.module.load_state_dict(state["model"])
    ctl = controller(fresh)  # sketch_seed=0 here: the state's 7 must win
    ctl.load_state_dict(state["ctl"])
    second = train(fresh, calls, ctl, rank, 6, j=state["j"], schedule_t=3)
    return {"records": first["records"] + second["records"], "params": second["params"]}


def sketch_job(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, norm, kw in [
        ("sketch", "sketch", {}),
        ("exact", "exact", {}),
        ("items", "sketch", {"per_item": True}),
        ("nan", "sketch", {"nan_at": 1}),
    ]:
        model, calls = counting_ddp()
        out[name] = train(model, calls, controller(model, norm), rank, len(THRESHOLDS), **kw)
    out["uninterrupted"] = (lambda m, c: train(m, c, controller(m, sketch_seed=7), rank, 6))(
        *counting_ddp()
    )
    out["resumed"] = resume(rank)
    out["refusals"] = refusals(rank)
    out["divergence"] = divergence(rank)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(sketch_job, WORLD, deadline_s=240)


def replay_means(records: list[dict[str, Any]], per_item: bool) -> list[list[torch.Tensor]]:
    """One process over every rank's micro-batches, closing where the run closed: the mean
    gradient of each logical batch."""
    model = make_model()
    opt = make_optimizer(model)
    means, units = [], 0
    for j, record in enumerate(records):
        for rank in range(WORLD):
            n = ITEMS[j % len(ITEMS)][rank] if per_item else MICRO_BATCH
            x, y = make_batch(j, rank, n)
            err = (model(x) - y).pow(2)
            (err.sum() if per_item else err.mean()).backward()
            units += n if per_item else 1
        if record["ready"]:
            for p in model.parameters():
                p.grad /= units
            means.append([p.grad.detach().clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            units = 0
    return means


@pytest.mark.slow
def test_every_rank_takes_the_same_decision_at_every_micro_step(ranks: list) -> None:
    for run in ("sketch", "items", "nan", "uninterrupted", "resumed"):
        a, b = (r[run]["records"] for r in ranks)
        assert [x["ready"] for x in a] == [x["ready"] for x in b], run
        assert [repr(x["estimate"]) for x in a] == [repr(x["estimate"]) for x in b], run


@pytest.mark.slow
def test_decisions_agree_with_exact_gnts_away_from_the_knife_edge(ranks: list) -> None:
    records = ranks[0]["sketch"]["records"]
    sd = math.sqrt(2 / SIZE)
    agree, margins, errors = [], [], []
    for r in records:
        exact_ready = r["exact"] <= r["threshold"] or r["micro_steps"] == MAX_ACCUMULATION
        agree.append(exact_ready == r["ready"])
        margins.append(abs((r["exact"] / r["threshold"]) ** 2 - 1))
        errors.append((r["estimate"] / r["exact"]) ** 2 - 1)
    assert sum(m > 3 * sd for m in margins) >= 0.85 * len(records)  # not a knife-edge problem
    assert sum(agree) >= 0.95 * len(records)
    assert all(ok or margin < 4 * sd for ok, margin in zip(agree, margins))
    assert 0 < sum(not r["ready"] for r in records) and 0 < sum(r["ready"] for r in records)
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert 1e-4 < rms < 1.5 * sd  # it does estimate, and within the promised spread


@pytest.mark.slow
def test_one_gradient_all_reduce_per_optimizer_step(ranks: list) -> None:
    for rank in range(WORLD):
        exact = ranks[rank]["exact"]["records"]
        # exact mode: DDP's hook reduces every micro-step (one bucket: one call)
        assert [r["grad_allreduces"] for r in exact] == [1] * len(exact)
        for run in ("sketch", "items"):
            records = ranks[rank][run]["records"]
            assert sum(r["ready"] for r in records) == len(THRESHOLDS)
            assert len(records) > len(THRESHOLDS)  # it accumulated
            # sketch mode: the hook reduces on the closing micro-step only
            assert [r["grad_allreduces"] for r in records] == [int(r["ready"]) for r in records]
            # and the sketch's all-reduce is the one other collective of each micro-step
            assert [r["collectives"] for r in records] == [1] * len(records)


@pytest.mark.slow
@pytest.mark.parametrize("run, per_item", [("sketch", False), ("items", True)])
def test_grad_when_ready_is_the_exact_mean_gradient(ranks: list, run: str, per_item: bool) -> None:
    want = replay_means(ranks[0][run]["records"], per_item)
    for rank in range(WORLD):
        got = [r["grads"] for r in ranks[rank][run]["records"] if r["ready"]]
        assert len(got) == len(want) == len(THRESHOLDS)
        for step_got, step_want in zip(got, want):
            for a, b in zip(step_got, step_want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_nan_on_one_rank_drops_the_batch_on_both_without_reducing(ranks: list) -> None:
    for rank in range(WORLD):
        records = ranks[rank]["nan"]["records"]
        drop = next(r for r in records if r["dropped"] == 1)  # right after the drop
        assert drop["grads_none"] and not drop["ready"] and drop["grad_allreduces"] == 0
        assert records[-1]["dropped"] == 1
        assert sum(r["grad_allreduces"] for r in records) == len(THRESHOLDS)
    for a, b in zip(ranks[0]["nan"]["params"], ranks[1]["nan"]["params"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.slow
def test_resume_continues_the_same_sketches(ranks: list) -> None:
    for rank in range(WORLD):
        resumed, straight = ranks[rank]["resumed"], ranks[rank]["uninterrupted"]
        assert [repr(r["estimate"]) for r in resumed["records"]] == [
            repr(r["estimate"]) for r in straight["records"]
        ]
        for a, b in zip(resumed["params"], straight["params"]):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_fsdp_and_static_graph_are_refused_naming_exact(ranks: list) -> None:
    for rank in range(WORLD):
        refused = ranks[rank]["refusals"]
        assert (
            "requires norm to be 'exact' for an FSDP model (pass norm=\"exact\")"
            in (refused["fsdp2"])
        )
        assert refused["fsdp2_config"].startswith(
            "control.norm: expected 'exact' for an FSDP model"
        )
        assert 'static_graph=True (pass norm="exact")' in refused["static_graph"]


@pytest.mark.slow
def test_ranks_out_of_step_raise_on_every_rank(ranks: list) -> None:
    for rank in range(WORLD):
        diverged = ranks[rank]["divergence"]
        assert "ranks diverged: their accumulate() calls no longer line up" in diverged["batch"]
        assert "rank 0: GradientNormThreshold, logical batch 0" in diverged["batch"]
        assert "rank 1: GradientNormThreshold, logical batch 1" in diverged["batch"]
        assert "they read different targets [1.0, 2.0]" in diverged["target"]


@pytest.mark.slow
def test_the_job_runs_sketched_gnts_under_ddp_and_refuses_it_under_fsdp(tmp_path: Any) -> None:
    from _job_runs import GNTS, STEPS, TINY, finish, launch, ok, records, run_args, sets

    sketched = ["control.norm=sketch", "control.sketch_size=1024"]
    torchrun = ["--nproc-per-node", "2"]
    ddp = launch(
        ["train", GNTS, *sets([*TINY, *sketched]), *run_args(tmp_path / "ddp")], None, torchrun
    )
    fsdp = launch(
        [
            "train",
            GNTS,
            *sets([*TINY, *sketched, "distributed.strategy=fsdp"]),
            *run_args(tmp_path / "fsdp"),
        ],
        None,
        torchrun,
    )
    ok(ddp)
    steps = records(tmp_path / "ddp")
    assert len(steps) == STEPS and sum(s["micro_steps"] for s in steps) > STEPS  # accumulated
    assert all(math.isfinite(s["control"]["grad_norm"]) for s in steps)
    code, _, err = finish(fsdp)
    assert code != 0 and "control.norm: expected 'exact' for an FSDP model" in err
