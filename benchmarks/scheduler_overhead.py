"""Per-step cost of SynchronousSchedule.step() against stock torch and the original library.

For K = 3 scheduled keys and G param groups, times one optimizer step's scheduling, as
the loop of a training script makes it (``for ...: schedule.step()``), of:

- schedany:  one optimizer, ``SynchronousSchedule`` of three built-in cosine schedules on
  ``lr``, ``weight_decay`` and a custom key;
- (a) torch: three optimizers, one stock ``LambdaLR`` each on ``lr``, same curve function
  (the baseline of both ratios (a) and (d); goal: <= 1.15x);
- (d) own:   the user's own ``LambdaLR`` (same curve) bound to the same three keys with
  ``arbitrary_schedule_factory``, in a ``SynchronousSchedule``;
- (c) clock: schedany's three schedules counting tokens on a :class:`schedany.Clock`:
  ``clock.advance(samples=1, tokens=n)`` with an irregular ``n``, then ``step()``, so the
  ratio counts the advance too (goal: <= 1.05x schedany); ``(c) step`` is ``step()``
  alone, the same loop less a loop of only the advances (timed with the others);
- (b) tsa:   ``torch-schedule-anything`` 1.2.3 doing what schedany does (its own cosine
  built-ins and SynchronousSchedule), if it can be imported or installed.

All variants are measured in one run, interleaved repeat by repeat, and the median is
reported. Run: ``python benchmarks/scheduler_overhead.py [--quick] [--no-install]``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.optim.lr_scheduler import LambdaLR

import schedany
from schedany.curves import warmup_anneal_curve

K = 3
GROUPS = (1, 10, 100, 1000)
TSA_VERSION = "1.2.3"
# Long enough that every timed step is inside the cosine anneal (no clamped tail).
W, A, L, M = 1.0, 0.1, 10, 10**9

# torch-schedule-anything's proxy never sees optimizer.step(), so torch warns on its first
# step whatever the order; the benchmark does not care.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")


def make_optimizer(groups: int) -> torch.optim.AdamW:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.AdamW(
        [
            {"params": [p], "lr": 1e-3 * (1 + i % 7), "weight_decay": 0.01 * (1 + i % 5)}
            for i, p in enumerate(params)
        ]
    )


Run = Callable[[int], None]
"""``run(n)``: ``n`` optimizer steps' worth of scheduling, written as a training loop
writes it (every variant is timed as such a loop, so no variant pays a wrapper call)."""


def loop(step: Callable[[], None]) -> Run:
    def run(n: int) -> None:
        for _ in range(n):
            step()

    return run


def build_schedany(groups: int) -> Run:
    optimizer = make_optimizer(groups)
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(
                optimizer, W, A, L, M, schedule_target=target, default_value=default
            )
            for target, default in (("lr", None), ("weight_decay", None), ("clip", 1.0))
        ]
    )
    optimizer.step()  # no grads: a no-op that satisfies torch's step-order check
    return loop(schedule.step)


def build_own_lambdalr(groups: int) -> Run:
    curve = warmup_anneal_curve(
        warmup_to_value=W, anneal_to_value=A, num_warmup_steps=L, num_training_steps=M
    )
    optimizer = make_optimizer(groups)
    schedule = schedany.SynchronousSchedule(
        [
            schedany.arbitrary_schedule_factory(
                optimizer,
                lambda proxy: LambdaLR(proxy, curve),
                default_value=default,
                schedule_target=target,
            )
            for target, default in (("lr", None), ("weight_decay", None), ("clip", 1.0))
        ]
    )
    optimizer.step()
    return loop(schedule.step)


def build_clock(groups: int) -> Run:
    optimizer = make_optimizer(groups)
    clock = schedany.Clock()
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(
                optimizer, W, A, L, M, schedule_target=target, default_value=default, unit="tokens"
            )
            for target, default in (("lr", None), ("weight_decay", None), ("clip", 1.0))
        ],
        clock=clock,
    )
    optimizer.step()
    tokens = itertools.cycle([1, 3, 2, 5])  # every step moves every member: 1 step or a jump
    step = schedule.step

    def run(n: int) -> None:
        for count in itertools.islice(tokens, n):
            clock.advance(samples=1, tokens=count)
            step()

    return run


def build_advance(groups: int) -> Run:
    """The clock variant's advances alone, to take out of it for ``step()``'s share."""
    clock = schedany.Clock()
    tokens = itertools.cycle([1, 3, 2, 5])

    def run(n: int) -> None:
        for count in itertools.islice(tokens, n):
            clock.advance(samples=1, tokens=count)

    return run


def build_lambdalr(groups: int) -> Run:
    curve = warmup_anneal_curve(
        warmup_to_value=W, anneal_to_value=A, num_warmup_steps=L, num_training_steps=M
    )
    optimizers = [make_optimizer(groups) for _ in range(K)]
    a, b, c = (LambdaLR(opt, curve) for opt in optimizers)
    for opt in optimizers:
        opt.step()

    def run(n: int) -> None:
        for _ in range(n):
            a.step()
            b.step()
            c.step()

    return run


def tsa_builder(tsa: ModuleType) -> Callable[[int], Run]:
    def build(groups: int) -> Run:
        optimizer = make_optimizer(groups)
        tsa.extend_optimizer(optimizer, "clip", 1.0)
        schedule = tsa.SynchronousSchedule(
            [
                tsa.cosine_annealing_with_warmup(optimizer, W, A, L, M, schedule_target=target)
                for target in ("lr", "weight_decay", "clip")
            ]
        )
        optimizer.step()
        return loop(schedule.step)

    return build


def load_tsa(install: bool) -> tuple[ModuleType | None, str]:
    """The original library, or None and the reason it is skipped."""
    try:
        module = importlib.import_module("torch_schedule_anything")
    except ImportError:
        if not install:
            return None, "torch_schedule_anything is not importable and --no-install was given"
        # A private folder, so the benchmark never changes the project's environment.
        target = Path(tempfile.gettempdir()) / f"schedany-bench-tsa-{TSA_VERSION}"
        if not (target / "torch_schedule_anything").is_dir():
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--target",
                    str(target),
                    f"torch-schedule-anything=={TSA_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                return None, f"pip install torch-schedule-anything=={TSA_VERSION} failed: {last}"
        sys.path.insert(0, str(target))
        try:
            module = importlib.import_module("torch_schedule_anything")
        except ImportError as error:
            return None, f"installed, but the import failed: {error}"
    version = getattr(module, "__version__", "unknown")
    if version != TSA_VERSION:
        return (
            None,
            f"torch_schedule_anything {version} is installed, this benchmark wants {TSA_VERSION}",
        )
    return module, f"torch_schedule_anything {version}"


def per_step_seconds(run: Run, n: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        run(n)
        return (time.perf_counter() - start) / n
    finally:
        gc.enable()


def measure(
    builders: dict[str, Callable[[int], Run]],
    groups: int,
    repeats: int,
    budget_s: float,
) -> dict[str, float]:
    runs = {name: build(groups) for name, build in builders.items()}
    # Calibrate the step count so one timed block of the slowest variant takes ~budget_s.
    slowest = max(per_step_seconds(run, 3) for run in runs.values())
    n = max(3, min(5000, int(budget_s / max(slowest, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for r in range(repeats):  # interleaved: each repeat times every variant once,
        for name, run in order[r % len(order) :] + order[: r % len(order)]:  # in rotating order
            samples[name].append(per_step_seconds(run, n))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter blocks")
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not pip-install torch-schedule-anything if it is missing",
    )
    parser.add_argument("--groups", type=int, nargs="+", default=list(GROUPS))
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved repeats per G (default 15, 6 with --quick)",
    )
    args = parser.parse_args()
    repeats, budget = (6, 0.01) if args.quick else (15, 0.02)
    repeats = args.repeats or repeats

    builders: dict[str, Callable[[int], Run]] = {
        "schedany": build_schedany,
        "lambdalr": build_lambdalr,
        "own": build_own_lambdalr,
        "clock": build_clock,
        "advance": build_advance,
    }
    tsa, tsa_note = load_tsa(install=not args.no_install)
    if tsa is not None:
        builders["tsa"] = tsa_builder(tsa)

    print(
        f"torch {torch.__version__}, python {sys.version.split()[0]}, K = {K} keys; "
        f"median of {repeats} interleaved repeats"
    )
    print(f"(b) baseline: {tsa_note}" if tsa else f"(b) column skipped: {tsa_note}")
    header = (
        f"{'G':>5} | {'schedany':>10} | {'3x LambdaLR':>11} | {'(a) ratio':>9} | "
        f"{'own LambdaLR':>12} | {'(d) ratio':>9} | "
        f"{'tsa 1.2.3':>10} | {'(b) ratio':>9} | {'with clock':>10} | {'(c) ratio':>9} | "
        f"{'(c) step':>8} | "
        f"{'us per group*key':>16}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for groups in args.groups:
        t = measure(builders, groups, repeats, budget)
        ours, stock = t["schedany"], t["lambdalr"]
        per_unit = ours / (groups * K) * 1e6
        rows.append((groups, ours))
        tsa_cells = (
            f"{t['tsa'] * 1e3:8.3f}ms | {ours / t['tsa']:9.3f}"
            if "tsa" in t
            else f"{'-':>10} | {'-':>9}"
        )
        print(
            f"{groups:>5} | {ours * 1e3:8.3f}ms | {stock * 1e3:9.3f}ms | {ours / stock:9.3f} | "
            f"{t['own'] * 1e3:10.3f}ms | {t['own'] / stock:9.3f} | "
            f"{tsa_cells} | {t['clock'] * 1e3:8.3f}ms | {t['clock'] / ours:9.3f} | "
            f"{(t['clock'] - t['advance']) / ours:8.3f} | "
            f"{per_unit:16.3f}",
            flush=True,
        )

    if len(rows) >= 2:
        # Linear in G*K: each 10x more groups costs ~10x (log-log slope ~1); the slope
        # stays below 1 while the fixed per-step cost still shows at small G.
        slopes = ", ".join(
            f"G {g0}->{g1}: x{t1 / t0:.1f} (slope {math.log(t1 / t0) / math.log(g1 / g0):.2f})"
            for (g0, t0), (g1, t1) in zip(rows, rows[1:])
        )
        print(f"linear growth in G*K (K = {K} fixed): {slopes}; 1.00 = linear")


if __name__ == "__main__":
    main()
