"""Per-step cost of ScheduleLogger logging 4 scheduled keys x 100 param groups every step.

One run times the reference job's optimizer step with and without ``logger.log(step)``
and prints the ratio (target <= 1.03). The step is
:meth:`schedany.job.trainer.Trainer.train_step` on
``examples/configs/baseline.yaml`` (byte-level transformer, micro-batch 16 x 64 bytes,
AdamW). The job's own optimizer has two param groups, so the 400 logged values come
from a stand-in: a SynchronousSchedule on lr, weight_decay, betas[0] and a custom key
over a 100-group throwaway optimizer, stepped alongside in *both* arms; the arms differ
only by the ``log`` call.

Steps run in pairs of blocks (not logging, logging; then the other order) so drift
hits both arms alike; each logging block ends with ``flush()`` inside the timed
region. Three numbers: the ratio on process CPU time (all threads) and on wall time,
each the median over block pairs, and the time spent inside ``log()`` + ``flush()``
itself. The logger's own writer runs no thread, so that last one is its whole cost and
is the steadiest figure on a shared machine, where the A/B ratios swing with other
people's jobs; it is also printed split in two, since ``flush()`` is an fsync
(tensorboardX's ``RecordWriter``) that the trainer does once per checkpoint, not every
``--block-steps`` steps as here. Torch uses one intra-op thread by default so idle
OpenMP spinning does not pad the CPU time.

    python benchmarks/logging_overhead.py [--pairs 8] [--block-steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import StepLR

import schedany
from schedany.config import load_config
from schedany.integrations.tensorboard import ScheduleLogger
from schedany.job.trainer import Trainer

NUM_GROUPS = 100
CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "baseline.yaml"


def stand_in_schedule() -> schedany.SynchronousSchedule:
    """4 keys x NUM_GROUPS groups on a throwaway optimizer (one named group)."""
    groups: list[dict] = [
        {"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(NUM_GROUPS)
    ]
    groups[0]["name"] = "embed"
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    return schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 10, 1000),
            schedany.arbitrary_schedule_factory(
                optimizer,
                lambda o: StepLR(o, step_size=5, gamma=0.9),
                schedule_target="weight_decay",
            ),
            schedany.linear_schedule_with_warmup(
                optimizer, 1.0, 0.9, 10, 1000, schedule_target="betas[0]"
            ),
            schedany.constant_with_warmup(
                optimizer, 1.0, 20, schedule_target="logical_batch_size", default_value=64.0
            ),
        ]
    )


def measure(pairs: int, block_steps: int, log_dir: str) -> dict[str, list[float]]:
    """Seconds per step of each block: ``plain_cpu``, ``plain_wall``, ``logged_cpu``,
    ``logged_wall``, and ``in_log`` (wall time inside ``log()``); ``in_flush``: seconds
    of the block's one ``flush()``."""
    config = load_config(
        CONFIG,
        [
            "train.log_dir=null",
            "train.checkpoint_dir=null",
            "train.progress=none",
            "data.max_bytes=262144",
            "train.steps=100000",
        ],
    )
    trainer = Trainer(config)
    schedule = stand_in_schedule()
    logger = ScheduleLogger(schedule, log_dir=log_dir)
    assert len(logger.tags) == 4 * NUM_GROUPS
    out: dict[str, list[float]] = {
        k: []
        for k in ("plain_cpu", "plain_wall", "logged_cpu", "logged_wall", "in_log", "in_flush")
    }

    def run(n: int, log: bool) -> None:
        in_log = 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            trainer.train_step()
            schedule.optimizer.step()  # no gradients: a no-op that keeps torch's order check quiet
            if log:
                t = time.perf_counter()
                logger.log(trainer.step)
                in_log += time.perf_counter() - t
            schedule.step()
        in_flush = 0.0
        if log:
            t = time.perf_counter()
            logger.flush()
            in_flush = time.perf_counter() - t
        arm = "logged" if log else "plain"
        out[f"{arm}_cpu"].append((time.process_time() - cpu) / n)
        out[f"{arm}_wall"].append((time.perf_counter() - wall) / n)
        if log:
            out["in_log"].append(in_log / n)
            out["in_flush"].append(in_flush)

    run(3, True)  # warm-up: optimizer state, tensorboard imports, the event file
    run(3, False)
    for values in out.values():
        values.clear()
    for i in range(pairs):  # ABBA order, so a slow drift does not favour one arm
        for log in (False, True) if i % 2 == 0 else (True, False):
            run(block_steps, log)
    logger.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="block pairs (plain, logged)")
    parser.add_argument("--block-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs "
        f"(load {load}); 4 keys x {NUM_GROUPS} groups logged every step; "
        f"{args.pairs} pairs of blocks of {args.block_steps} steps"
    )
    with tempfile.TemporaryDirectory() as log_dir:
        r = measure(args.pairs, args.block_steps, log_dir)
    med = statistics.median
    for clock in ("cpu", "wall"):
        plain, logged = r[f"plain_{clock}"], r[f"logged_{clock}"]
        ratio = med(g / p for p, g in zip(plain, logged))
        print(
            f"{clock:>4}: step {med(plain) * 1e3:7.2f} ms, "
            f"with logging {med(logged) * 1e3:7.2f} ms, ratio {ratio:.3f} (median over block pairs)"
        )
    in_log, in_flush, step = med(r["in_log"]), med(r["in_flush"]), med(r["plain_wall"])
    both = in_log + in_flush / args.block_steps
    print(
        f"inside log() + flush(): {both * 1e3:.3f} ms/step, ratio {(step + both) / step:.3f} "
        f"on the median step (the writer has no thread, so this is all it costs)"
    )
    print(
        f"  of which log() {in_log * 1e3:.3f} ms/step, ratio {(step + in_log) / step:.3f}; "
        f"flush() {in_flush * 1e3:.3f} ms once per {args.block_steps} steps"
    )


if __name__ == "__main__":
    main()
