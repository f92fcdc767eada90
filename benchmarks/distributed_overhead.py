"""What the control loops cost under DDP, next to the hand-written loops they replace.

Two gloo ranks on CPU train a ~5.3 M-parameter MLP. Every variant takes optimizer steps
of k = 8 micro-steps; they run interleaved, round after round, in the same processes,
and the table reports the median seconds per optimizer step, the median over rounds of
the ratio to the hand-written baseline measured in the same round (pairing cancels the
load drifts of a shared machine), and the collectives per optimizer step (counted in a separate,
untimed pass: DDP gradient syncs through a comm hook, everything else by wrapping the
``torch.distributed`` functions).

    python benchmarks/distributed_overhead.py [--rounds 15] [--steps 1] [--batch 16]
                                              [--error-steps 16]

Targets: LogicalBatchSize ≤ 1.05 × the hand-written ``no_sync`` loop, GNTS ≤ 1.05 × a
hand-written loop that syncs every micro-step and computes the norm, and sketched GNTS
(``norm="sketch"``) ≤ 1.15 × the ``no_sync`` loop and ≤ 0.5 × exact GNTS. With num_items,
the table also shows the hand-written loop plus one tiny all-gather per micro-step: the
floor for any loop that counts items exactly, since that latency-bound collective (and
the rank-to-rank waiting it implies) is the cost of exactness, not of schedany.

After the table: the sketch's relative error on the global gradient norm of this model
(median and 99th percentile over ``--error-steps`` × k micro-steps, against the exact
norm of the same gradients) for m = 2^14, 2^16 and 2^18, to choose ``sketch_size`` by.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from schedany.control import GradientNormThreshold, LogicalBatchSize

K = 8  # micro-steps per optimizer step
WIDTH = 1024


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(  # 5.25 M parameters
        nn.Linear(WIDTH, 2 * WIDTH),
        nn.ReLU(),
        nn.Linear(2 * WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, 1),
    )


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y, reduction=reduction)


# --- the variants: one optimizer step each ---------------------------------------------------


def hand_no_sync(model: DDP, opt: Any, batches: list, state: dict) -> None:
    for i, (x, y) in enumerate(batches):
        # no all-reduce until the last micro-step; DDP reads the flag in forward()
        with model.no_sync() if i < K - 1 else contextlib.nullcontext():
            (loss_of(model, x, y, "mean") / K).backward()
    opt.step()
    opt.zero_grad()


def hand_no_sync_gather(model: DDP, opt: Any, batches: list, state: dict) -> None:
    """The floor for any exact num_items loop: one tiny all-gather per micro-step."""
    world = dist.get_world_size()
    for i, (x, y) in enumerate(batches):
        counts = torch.empty(4 * world, dtype=torch.int64)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(counts, torch.tensor([0, 0, i, len(x)]))
        with model.no_sync() if i < K - 1 else contextlib.nullcontext():
            (loss_of(model, x, y, "mean") / K).backward()
    opt.step()
    opt.zero_grad()


def hand_sync_every(model: DDP, opt: Any, batches: list, state: dict) -> None:
    for x, y in batches:
        (loss_of(model, x, y, "mean") / K).backward()
    opt.step()
    opt.zero_grad()


def hand_gnts(model: DDP, opt: Any, batches: list, state: dict) -> None:
    threshold = opt.param_groups[0]["gradient_norm_threshold"]
    for k, (x, y) in enumerate(batches, start=1):
        loss_of(model, x, y, "mean").backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if torch.nn.utils.get_total_norm(grads) / k <= threshold or k == K:
            torch._foreach_div_(grads, k)
            opt.step()
            opt.zero_grad()
            return


def controlled(per_item: bool) -> Callable[[DDP, Any, list, dict], None]:
    def step(model: DDP, opt: Any, batches: list, state: dict) -> None:
        ctl = state["ctl"]
        for x, y in batches:
            with ctl.accumulate(num_items=len(x) if per_item else None):
                loss_of(model, x, y, "sum" if per_item else "mean").backward()
            if ctl.ready:
                opt.step()
                opt.zero_grad()
        assert ctl.ready, "the benchmark's targets must close after exactly K micro-steps"

    return step


def make_state(variant: str, model: DDP, opt: Any, batch: int) -> dict:
    world = dist.get_world_size()
    opt.param_groups[0]["logical_batch_size"] = K * batch * world
    opt.param_groups[0]["gradient_norm_threshold"] = 0.0  # never met: always K micro-steps
    if variant.startswith("LogicalBatchSize"):
        mbs = None if "num_items" in variant else batch
        return {"ctl": LogicalBatchSize(model, opt, micro_batch_size=mbs)}
    if variant.startswith("GradientNormThreshold"):
        norm = "sketch" if "sketch" in variant else "exact"
        return {"ctl": GradientNormThreshold(model, opt, max_accumulation_steps=K, norm=norm)}
    return {}


VARIANTS: dict[str, tuple[Callable, str]] = {  # name -> (one optimizer step, its baseline)
    "hand-written no_sync loop": (hand_no_sync, "hand-written no_sync loop"),
    "LogicalBatchSize(micro_batch_size)": (controlled(False), "hand-written no_sync loop"),
    "hand-written no_sync + 1 all-gather": (hand_no_sync_gather, "hand-written no_sync loop"),
    "LogicalBatchSize(num_items)": (controlled(True), "hand-written no_sync loop"),
    "hand-written, sync every micro-step": (hand_sync_every, "hand-written no_sync loop"),
    "hand-written GNTS (sync + norm)": (hand_gnts, "hand-written GNTS (sync + norm)"),
    "GradientNormThreshold": (controlled(False), "hand-written GNTS (sync + norm)"),
    "GradientNormThreshold(norm='sketch')": (controlled(False), "hand-written no_sync loop"),
}
PAIRS = [  # further ratios printed under the table, from the same rounds: (variant, baseline)
    ("GradientNormThreshold(norm='sketch')", "GradientNormThreshold"),
    # The floor of the line above: no loop that syncs the gradients once per optimizer step
    # is cheaper than the hand-written no_sync loop, so sketched / exact cannot go below it.
    ("hand-written no_sync loop", "GradientNormThreshold"),
]
SKETCH_SIZES = [2**14, 2**16, 2**18]


def sketch_errors(batches: list, steps: int) -> dict[int, list[float]]:
    """|estimated / exact - 1| of the global mean-gradient norm, per micro-step, per m."""
    world = dist.get_world_size()
    errors: dict[int, list[float]] = {}
    for size in SKETCH_SIZES:
        model = DDP(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        opt.param_groups[0]["gradient_norm_threshold"] = 0.0  # always K micro-steps
        ctl = GradientNormThreshold(
            model, opt, max_accumulation_steps=K, norm="sketch", sketch_size=size
        )
        errors[size] = []
        for _ in range(steps):
            for x, y in batches:
                with ctl.accumulate():
                    loss_of(model, x, y, "mean").backward()
                grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                if ctl.ready:  # synced and divided: the exact mean gradient
                    exact = float(grads.norm())
                else:  # still local: sum over ranks here, outside the controller
                    dist.all_reduce(grads)
                    exact = float(grads.norm()) / (world * ctl.metrics()["micro_steps"])
                errors[size].append(abs(ctl.metrics()["grad_norm"] / exact - 1))
                if ctl.ready:
                    opt.step()
                    opt.zero_grad()
    return errors


# --- measurement ------------------------------------------------------------------------------


def count_per_step(name: str, batches: list, batch: int) -> tuple[float, float]:
    """(gradient syncs, other collectives) per optimizer step, from one untimed step."""
    hook_calls = [0]

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations
        hook_calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    model = DDP(make_model())
    model.register_comm_hook(None, hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    state = make_state(name, model, opt, batch)
    for _ in range(2):  # DDP rebuilds its buckets after the first step; count the second
        hook_calls[0] = 0
        VARIANTS["hand-written no_sync loop"][0](model, opt, batches, {})
    buckets = hook_calls[0]  # bucket all-reduces in one gradient sync
    hook_calls[0] = 0
    names = ["all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier"]
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    calls = [0]

    def counting(original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return original(*args, **kwargs)

        return wrapper

    for n, original in originals.items():
        setattr(dist, n, counting(original))
    try:
        VARIANTS[name][0](model, opt, batches, state)
    finally:
        for n, original in originals.items():
            setattr(dist, n, original)
    # the hook's own all-reduces go through dist.all_reduce too
    return hook_calls[0] / buckets, float(calls[0] - hook_calls[0])


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    g = torch.Generator().manual_seed(rank)
    batches = [
        (torch.randn(args.batch, WIDTH, generator=g), torch.randn(args.batch, 1, generator=g))
        for _ in range(K)
    ]
    counts = {name: count_per_step(name, batches, args.batch) for name in VARIANTS}

    runs = {}
    for name in VARIANTS:
        model = DDP(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        runs[name] = (model, opt, make_state(name, model, opt, args.batch))
        VARIANTS[name][0](model, opt, batches, runs[name][2])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(runs)
    for r in range(args.rounds):
        # a rotated order each round, so no variant always runs right after another
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, opt, state = runs[name]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                VARIANTS[name][0](model, opt, batches, state)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank sets the pace
            times[name].append(elapsed.item() / args.steps)
    errors = sketch_errors(batches, args.error_steps)
    if rank == 0:
        torch.save(
            {
                "times": times,
                "counts": counts,
                "errors": errors,
                "params": sum(p.numel() for p in make_model().parameters()),
            },
            out,
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median taken)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per measurement")
    parser.add_argument("--batch", type=int, default=16, help="samples per rank per micro-step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--error-steps", type=int, default=16, help="optimizer steps per sketch size (errors)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2)
        result = torch.load(out, weights_only=False)
    times = result["times"]
    print(
        f"2 ranks, gloo, CPU ({args.threads} thread/rank), torch {torch.__version__}, "
        f"{result['params'] / 1e6:.2f} M params, k = {K} micro-steps of {args.batch} "
        f"samples/rank; {args.rounds} interleaved rounds of {args.steps} step(s); "
        "ratio = median over rounds of (variant / baseline, same round)"
    )
    header = (
        f"{'variant':<38} {'s/step':>7} {'ratio':>6}  {'baseline':<36} "
        f"{'grad syncs/step':>15} {'other collectives/step':>22}"
    )
    print(header)
    print("-" * len(header))
    for name, (_, baseline) in VARIANTS.items():
        syncs, other = result["counts"][name]
        ratio = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        print(
            f"{name:<38} {statistics.median(times[name]):7.3f} {ratio:6.3f}  {baseline:<36} "
            f"{syncs:15.0f} {other:22.0f}"
        )
    for name, baseline in PAIRS:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        print(f"{name} / {baseline}: {ratio:.3f} (median over rounds)")
    print(
        "\nsketch's relative error of the global gradient norm, |estimate/exact - 1|, over "
        f"{len(next(iter(result['errors'].values())))} micro-steps:"
    )
    print(f"{'m':>8} {'median':>8} {'p99':>8} {'max':>8}  sqrt(1/(2m)) (≈ sd of the norm)")
    for size, errs in result["errors"].items():
        q = torch.tensor(errs, dtype=torch.float64)
        print(
            f"{size:>8} {q.median():8.4f} {q.quantile(0.99):8.4f} {q.max():8.4f}  "
            f"{(1 / (2 * size)) ** 0.5:8.4f}"
        )


if __name__ == "__main__":
    main()
