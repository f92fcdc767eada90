"""The control loops on 2 gloo ranks (DDP, FSDP2, FSDP1) against one process.

Invariant: W ranks running a controller over uneven micro-batches take the decisions,
and reach the parameters, of one process that sees every rank's samples, while
communicating no more than the spec allows; a rank that drifts out of step makes the
others raise instead of hang.

Each spawned job batches several scenarios (spawning is the expensive part); the
single-process references run in the pytest process.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist_utils import count_collectives, run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from schedany.control import GradientNormThreshold, LogicalBatchSize

pytestmark = pytest.mark.slow

F64 = torch.float64
WORLD = 2
STEPS = 6
# Items per global micro-step, per rank: uneven across ranks and steps, rank 1 often tiny.
ITEMS = [(5, 1), (3, 7), (1, 2), (6, 4), (2, 1), (4, 3), (1, 5), (7, 2), (3, 1), (2, 6)]
MICRO_BATCH = 3  # per rank, for the runs without num_items
TARGETS = [8.0, 14.0, 5.0, 20.0, 3.0, 12.5]  # logical batch size per optimizer step
THRESHOLDS = [2.0, 1.2, 0.9, 0.8, 0.7, 0.6]  # GNTS threshold per optimizer step
MAX_ACCUMULATION = 4


# --- the problem every rank and the reference share -------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)


def make_batch(j: int, rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * j + rank)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    return x, x.sum(1, keepdim=True).sin() + torch.randn(n, 1, generator=g, dtype=F64)


def items_of(j: int, rank: int, per_item: bool) -> int:
    return ITEMS[j % len(ITEMS)][rank] if per_item else MICRO_BATCH


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # SGD, not Adam: Adam's update hides a wrongly scaled gradient.
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)


class TableSchedule:
    """A stand-in schedule: writes ``table[t]`` into every param group's ``key``."""

    def __init__(self, optimizer: torch.optim.Optimizer, key: str, table: list[float]) -> None:
        self.optimizer, self.key, self.table, self.t = optimizer, key, table, 0
        self._write()

    def _write(self) -> None:
        for group in self.optimizer.param_groups:
            group[self.key] = self.table[min(self.t, len(self.table) - 1)]

    def step(self) -> None:
        self.t += 1
        self._write()

    def state_dict(self) -> dict[str, int]:
        return {"t": self.t}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.t = sd["t"]
        self._write()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Unsharded parameters in ``make_model()`` order (FSDP1's state dict is a full one)."""
    state = (model.module if isinstance(model, DDP) else model).state_dict()
    return [
        (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for v in state.values()
    ]


# --- single-process references -----------------------------------------------------------


def reference_logical_batch(per_item: bool) -> list[torch.Tensor]:
    """One process: each logical batch is every rank's micro-batches until N >= target."""
    model = make_model()
    opt = make_optimizer(model)
    j = 0
    for target in TARGETS[:STEPS]:
        xs, ys, n_total = [], [], 0
        while n_total < target or n_total == 0:
            for r in range(WORLD):
                x, y = make_batch(j, r, items_of(j, r, per_item))
                xs.append(x)
                ys.append(y)
                n_total += len(x)
            j += 1
        opt.zero_grad()
        (model(torch.cat(xs)) - torch.cat(ys)).pow(2).mean().backward()
        opt.step()
    return full_params(model)


def reference_gnts(per_item: bool) -> tuple[list[torch.Tensor], list[bool]]:
    """One process running GNTS over global micro-steps (every rank's micro-batch)."""
    model = make_model()
    opt = make_optimizer(model)
    decisions: list[bool] = []
    j = 0
    for tau in THRESHOLDS[:STEPS]:
        opt.zero_grad()
        k = n_total = 0
        while True:
            for r in range(WORLD):
                x, y = make_batch(j, r, items_of(j, r, per_item))
                err = (model(x) - y).pow(2)
                (err.sum() if per_item else err.mean()).backward()
                n_total += len(x)
            j, k = j + 1, k + 1
            units = n_total if per_item else k * WORLD
            mean_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) / units
            decisions.append(bool(mean_norm <= tau) or k == MAX_ACCUMULATION)
            if decisions[-1]:
                for p in model.parameters():
                    p.grad /= units
                opt.step()
                break
    return full_params(model), decisions


# --- what runs on every rank ---------------------------------------------------------------


def train(
    model: nn.Module,
    ctl: Any,
    opt: torch.optim.Optimizer,
    schedule: TableSchedule,
    rank: int,
    per_item: bool,
    *,
    j: int = 0,
    nan_at: int | None = None,
    save_to: str | None = None,
) -> dict[str, Any]:
    """The user's loop. ``nan_at``: micro-step at which rank 1's inputs turn NaN."""
    decisions, drops = [], []
    with count_collectives() as extra:
        while ctl.metrics()["optimizer_steps"] < STEPS:
            n = items_of(j, rank, per_item)
            x, y = make_batch(j, rank, n)
            if j == nan_at and rank == 1:
                x = x * float("nan")
            with ctl.accumulate(num_items=n if per_item else None):
                err = (model(x) - y).pow(2)
                (err.sum() if per_item else err.mean()).backward()
            j += 1
            decisions.append(ctl.ready)
            if ctl.metrics()["dropped_batches"] > len(drops):
                drops.append(
                    {**ctl.metrics(), "grads_none": all(p.grad is None for p in model.parameters())}
                )
            if ctl.ready:
                opt.step()
                opt.zero_grad()
                schedule.step()
                if save_to and ctl.metrics()["optimizer_steps"] == STEPS // 2:
                    torch.save(
                        {
                            "model": getattr(model, "module", model).state_dict(),
                            "opt": opt.state_dict(),
                            "schedule": schedule.state_dict(),
                            "ctl": ctl.state_dict(),
                            "j": j,
                        },
                        f"{save_to}.rank{rank}",
                    )
    return {
        "params": full_params(model),
        "decisions": decisions,
        "micro_steps": j,
        "extra": sum(extra.values()),
        "metrics": ctl.metrics(),
        "drops": drops,
    }


def ddp_run(rank: int, kind: str, per_item: bool, **kw: Any) -> dict[str, Any]:
    """A fresh DDP model whose comm hook counts gradient all-reduces."""
    hook_calls = [0]

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
        hook_calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    model = DDP(make_model())
    model.register_comm_hook(None, counting_hook)
    opt = make_optimizer(model)
    if kind == "lbs":
        schedule = TableSchedule(opt, "logical_batch_size", TARGETS)
        ctl: Any = LogicalBatchSize(model, opt, micro_batch_size=None if per_item else MICRO_BATCH)
    else:
        schedule = TableSchedule(opt, "gradient_norm_threshold", THRESHOLDS)
        ctl = GradientNormThreshold(model, opt, max_accumulation_steps=MAX_ACCUMULATION)
    result = train(model, ctl, opt, schedule, rank, per_item, **kw)
    # The hook's all-reduce goes through dist.all_reduce too; "extra" is what is left.
    return {**result, "grad_allreduces": hook_calls[0], "extra": result["extra"] - hook_calls[0]}


def ddp_runs(rank: int, ckpt: str) -> dict[str, Any]:
    return {
        "lbs_items": ddp_run(rank, "lbs", True, save_to=f"{ckpt}/lbs"),
        "lbs_micro": ddp_run(rank, "lbs", False),
        "gnts_items": ddp_run(rank, "gnts", True, save_to=f"{ckpt}/gnts"),
        "gnts_micro": ddp_run(rank, "gnts", False),
        "lbs_nan": ddp_run(rank, "lbs", True, nan_at=1),
        "gnts_nan": ddp_run(rank, "gnts", True, nan_at=1),
    }


# --- DDP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("control_ckpt"))


def equivalence_job(rank: int, world_size: int, ckpt: str) -> dict[str, Any]:
    """Every DDP and FSDP scenario, in one pair of processes (spawning is the slow part)."""
    return {"plain": plain_module_errors(), "ddp": ddp_runs(rank, ckpt), "fsdp": fsdp_runs(rank)}


def plain_module_errors() -> dict[str, tuple[str, str]]:
    """Each controller built on the unwrapped module while 2 ranks are up: what it raised
    (before any collective, so every rank gets there)."""
    errors = {}
    for name, controller in (("lbs", LogicalBatchSize), ("gnts", GradientNormThreshold)):
        model = make_model()
        opt = make_optimizer(model)
        opt.param_groups[0]["logical_batch_size"] = 8.0
        opt.param_groups[0]["gradient_norm_threshold"] = 1.0
        try:
            controller(model, opt)
        except Exception as exc:
            errors[name] = (type(exc).__name__, str(exc))
    return errors


def test_plain_module_under_two_ranks_is_rejected_naming_ddp_and_fsdp(
    runs: list[dict[str, Any]],
) -> None:
    """It would count one rank's items (logical batches W times the target); the wrapped
    models of the same job (the tests below) are accepted."""
    for rank in range(WORLD):
        for name, owner in (("lbs", "LogicalBatchSize"), ("gnts", "GradientNormThreshold")):
            kind, message = runs[rank]["plain"][name]
            assert kind == "ValueError"
            assert message.startswith(
                f"{owner}: model is a plain Sequential, but a process group of 2 ranks is "
                "initialised; pass the model that trains, wrapped in DistributedDataParallel "
                "or FSDP (fully_shard)"
            )


@pytest.fixture(scope="module")
def runs(ckpt_dir: str) -> list[dict[str, Any]]:
    return run_ranks(equivalence_job, WORLD, ckpt=ckpt_dir)


@pytest.fixture(scope="module")
def ddp(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["ddp"] for r in runs]


@pytest.fixture(scope="module")
def fsdp(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["fsdp"] for r in runs]


def assert_params_equal(got: list[torch.Tensor], want: list[torch.Tensor], atol: float) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("per_item", [True, False], ids=["num_items", "micro_batch_size"])
def test_ddp_logical_batch_size_equals_one_process(ddp: list, per_item: bool) -> None:
    run = "lbs_items" if per_item else "lbs_micro"
    want = reference_logical_batch(per_item)
    for rank in range(WORLD):
        assert_params_equal(ddp[rank][run]["params"], want, atol=1e-9)
    assert ddp[0][run]["decisions"] == ddp[1][run]["decisions"]
    assert sum(ddp[0][run]["decisions"]) == STEPS


@pytest.mark.parametrize("per_item", [True, False], ids=["num_items", "micro_batch_size"])
def test_ddp_gnts_equals_one_process(ddp: list, per_item: bool) -> None:
    run = "gnts_items" if per_item else "gnts_micro"
    want_params, want_decisions = reference_gnts(per_item)
    assert 0 < want_decisions.count(False)  # the thresholds make it accumulate
    for rank in range(WORLD):
        assert ddp[rank][run]["decisions"] == want_decisions
        assert_params_equal(ddp[rank][run]["params"], want_params, atol=1e-9)


def test_ddp_collective_counts(ddp: list) -> None:
    for rank in range(WORLD):
        lbs_items, lbs_micro = ddp[rank]["lbs_items"], ddp[rank]["lbs_micro"]
        gnts = ddp[rank]["gnts_items"]
        # gradients are all-reduced once per optimizer step, never on the other micro-steps
        assert lbs_items["grad_allreduces"] == STEPS < lbs_items["micro_steps"]
        assert lbs_micro["grad_allreduces"] == STEPS < lbs_micro["micro_steps"]
        # micro_batch_size: nothing extra; num_items: one small all-gather per micro-step
        assert lbs_micro["extra"] == 0
        assert lbs_items["extra"] == lbs_items["micro_steps"]
        # GNTS syncs every micro-step and adds one all-gather to each
        assert gnts["grad_allreduces"] == gnts["micro_steps"]
        assert gnts["extra"] == gnts["micro_steps"]


@pytest.mark.parametrize("run", ["lbs_nan", "gnts_nan"])
def test_ddp_nan_on_one_rank_drops_the_batch_everywhere(ddp: list, run: str) -> None:
    per_rank = [ddp[rank][run] for rank in range(WORLD)]
    assert per_rank[0]["decisions"] == per_rank[1]["decisions"]
    for result in per_rank:
        assert result["metrics"]["dropped_batches"] == 1
        assert result["metrics"]["optimizer_steps"] == STEPS
        (drop,) = result["drops"]  # right after the drop: counters reset, gradients gone
        assert drop["micro_steps"] == drop["items"] == 0
        assert drop["grads_none"]
        assert all(torch.isfinite(p).all() for p in result["params"])
    # identical parameters on both ranks: the rank with finite gradients did not step either
    assert_params_equal(per_rank[0]["params"], per_rank[1]["params"], atol=0)


# --- resume in fresh processes -------------------------------------------------------------


def resume_job(rank: int, world_size: int, ckpt: str) -> dict[str, Any]:
    out = {}
    for kind in ("lbs", "gnts"):
        saved = torch.load(f"{ckpt}/{kind}.rank{rank}", weights_only=False)
        plain = make_model()
        plain.load_state_dict(saved["model"])
        model = DDP(plain)
        opt = make_optimizer(model)
        opt.load_state_dict(saved["opt"])
        if kind == "lbs":
            schedule = TableSchedule(opt, "logical_batch_size", TARGETS)
            ctl: Any = LogicalBatchSize(model, opt)
        else:
            schedule = TableSchedule(opt, "gradient_norm_threshold", THRESHOLDS)
            ctl = GradientNormThreshold(model, opt, max_accumulation_steps=MAX_ACCUMULATION)
        schedule.load_state_dict(saved["schedule"])
        ctl.load_state_dict(saved["ctl"])
        out[kind] = train(model, ctl, opt, schedule, rank, True, j=saved["j"])
    return out


def test_resume_in_fresh_processes_equals_the_uninterrupted_run(ddp: list, ckpt_dir: str) -> None:
    resumed = run_ranks(resume_job, WORLD, ckpt=ckpt_dir)
    for rank in range(WORLD):
        for kind, run in (("lbs", "lbs_items"), ("gnts", "gnts_items")):
            assert resumed[rank][kind]["micro_steps"] == ddp[rank][run]["micro_steps"]
            for a, b in zip(resumed[rank][kind]["params"], ddp[rank][run]["params"], strict=True):
                assert torch.equal(a, b)


# --- FSDP2 and FSDP1 ------------------------------------------------------------------------


def fsdp_run(kind: str, rank: int, wrapper: str, poison_shard_at: int | None = None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    model = make_model()
    if wrapper == "fsdp2":
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    opt = make_optimizer(model)
    if kind == "lbs":
        schedule = TableSchedule(opt, "logical_batch_size", TARGETS)
        ctl: Any = LogicalBatchSize(model, opt)
    else:
        schedule = TableSchedule(opt, "gradient_norm_threshold", THRESHOLDS)
        ctl = GradientNormThreshold(model, opt, max_accumulation_steps=MAX_ACCUMULATION)
    if poison_shard_at is None:
        return train(model, ctl, opt, schedule, rank, True)
    # Every micro-step closes a logical batch (so gradients are reduce-scattered). One
    # element of rank 1's gradient *shard* turns NaN: only rank 1 can see it, yet both
    # ranks must drop that batch.
    opt.param_groups[0]["logical_batch_size"] = 4.0
    opt.param_groups[0]["gradient_norm_threshold"] = float("inf")
    dropped = []
    for j in range(poison_shard_at + 2):
        x, y = make_batch(j, rank, 2)
        with ctl.accumulate(num_items=2):
            (model(x) - y).pow(2).sum().backward()
            if j == poison_shard_at and rank == 1:
                next(iter(model.parameters())).grad.to_local()[0, 0] = float("nan")
        dropped.append(ctl.metrics()["dropped_batches"])
        if ctl.ready:
            opt.step()
            opt.zero_grad()
    return {"dropped": dropped, "params": full_params(model), "metrics": ctl.metrics()}


def fsdp_runs(rank: int) -> dict[str, Any]:
    return {
        "lbs": fsdp_run("lbs", rank, "fsdp2"),
        "gnts": fsdp_run("gnts", rank, "fsdp2"),
        "lbs_poisoned": fsdp_run("lbs", rank, "fsdp2", poison_shard_at=1),
        "gnts_poisoned": fsdp_run("gnts", rank, "fsdp2", poison_shard_at=1),
        "fsdp1_lbs": fsdp_run("lbs", rank, "fsdp1"),
        "fsdp1_gnts": fsdp_run("gnts", rank, "fsdp1"),
    }


@pytest.mark.parametrize("wrapper", ["fsdp2", "fsdp1"])
def test_fsdp_equals_one_process(fsdp: list, wrapper: str) -> None:
    prefix = "" if wrapper == "fsdp2" else "fsdp1_"
    want_lbs = reference_logical_batch(per_item=True)
    want_gnts, want_decisions = reference_gnts(per_item=True)
    for rank in range(WORLD):
        assert_params_equal(fsdp[rank][prefix + "lbs"]["params"], want_lbs, atol=1e-9)
        assert fsdp[rank][prefix + "gnts"]["decisions"] == want_decisions
        assert_params_equal(fsdp[rank][prefix + "gnts"]["params"], want_gnts, atol=1e-9)


def test_fsdp2_nan_in_one_shard_drops_the_batch_everywhere(fsdp: list) -> None:
    for run in ("lbs_poisoned", "gnts_poisoned"):
        assert fsdp[0][run]["dropped"] == fsdp[1][run]["dropped"] == [0, 1, 1]
        assert fsdp[0][run]["metrics"]["optimizer_steps"] == 2
        assert all(torch.isfinite(p).all() for p in fsdp[0][run]["params"])


# --- divergence: an error, not a hang --------------------------------------------------------

PG_TIMEOUT_S = 3.0


def divergence_job(rank: int, world_size: int, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    # (a) rank 1 resumed from another checkpoint: the headers disagree, both ranks raise.
    model = DDP(make_model())
    opt = make_optimizer(model)
    opt.param_groups[0]["logical_batch_size"] = 100
    ctl = LogicalBatchSize(model, opt)
    if rank == 1:
        ctl.load_state_dict({**ctl.state_dict(), "optimizer_steps": 1})
    try:
        with ctl.accumulate(num_items=2):
            pass
    except RuntimeError as exc:
        out["mismatch"] = str(exc)

    # (a') GNTS: the ranks read different thresholds; the header's target tells, both raise.
    model = DDP(make_model())
    opt = make_optimizer(model)
    opt.param_groups[0]["gradient_norm_threshold"] = 1.0 + rank
    ctl = GradientNormThreshold(model, opt)
    try:
        with ctl.accumulate():
            x, y = make_batch(0, rank, 2)
            (model(x) - y).pow(2).mean().backward()
    except RuntimeError as exc:
        out["targets"] = str(exc)

    # (b) LogicalBatchSize, num_items: rank 1 makes one accumulate() call fewer.
    group = dist.new_group(timeout=timeout)
    model = DDP(make_model(), process_group=group)
    opt = make_optimizer(model)
    opt.param_groups[0]["logical_batch_size"] = 100
    ctl = LogicalBatchSize(model, opt)
    start = time.monotonic()
    try:
        for j in range(5 - rank):
            x, y = make_batch(j, rank, 2)
            with ctl.accumulate(num_items=2):
                (model(x) - y).pow(2).sum().backward()
    except RuntimeError as exc:
        out["lbs"] = (str(exc), time.monotonic() - start)

    # (c) GNTS: rank 0's extra micro-step meets no partner in DDP's gradient all-reduce.
    group = dist.new_group(timeout=timeout)
    model = DDP(make_model(), process_group=group)
    opt = make_optimizer(model)
    opt.param_groups[0]["gradient_norm_threshold"] = 0.0
    ctl = GradientNormThreshold(model, opt)
    start = time.monotonic()
    try:
        for j in range(3 - rank):
            x, y = make_batch(j, rank, 2)
            with ctl.accumulate():
                (model(x) - y).pow(2).mean().backward()
    except RuntimeError as exc:
        out["gnts"] = (str(exc), getattr(exc, "__notes__", []), time.monotonic() - start)

    # rank 1 stays alive (a real straggler would) until rank 0 has seen its errors
    if rank == 0:
        open(flag, "w").close()
    else:
        while not os.path.exists(flag):
            time.sleep(0.05)
    return out


def test_divergent_ranks_raise_instead_of_hanging(tmp_path: Any) -> None:
    start = time.monotonic()
    results = run_ranks(
        divergence_job, WORLD, deadline_s=60, destroy=False, flag=str(tmp_path / "done")
    )
    assert time.monotonic() - start < 45
    for rank in range(WORLD):
        assert "ranks diverged" in results[rank]["mismatch"]
        assert (
            "rank 0: LogicalBatchSize with num_items, logical batch 0" in results[rank]["mismatch"]
        )
        assert (
            "rank 1: LogicalBatchSize with num_items, logical batch 1" in results[rank]["mismatch"]
        )
        assert (
            "GradientNormThreshold: ranks diverged: they read different targets [1.0, 2.0] "
            "from 'gradient_norm_threshold'"
        ) in results[rank]["targets"]
    message, elapsed = results[0]["lbs"]
    assert "ranks diverged or a peer failed" in message and "micro-step 4" in message
    assert elapsed < PG_TIMEOUT_S + 5
    message, notes, elapsed = results[0]["gnts"]
    assert any("GradientNormThreshold.accumulate()" in n and "ranks diverged" in n for n in notes)
    assert elapsed < PG_TIMEOUT_S + 5
    assert "lbs" not in results[1] and "gnts" not in results[1]
