"""Optimizer-step time of the reference job against a bare hand-written loop.

For each example config, in one process:

- job:  ``schedany.job.trainer.Trainer`` built from the config (schedules, controller,
  per-step recording), timed over ``train_step()`` (what ``run()`` does each step when
  no log, eval or checkpoint is due);
- bare: the same model shape, corpus, sampler and AdamW param groups in a loop written by
  hand: no schedules, no controller, no recording. For an accumulating config it runs
  exactly the micro-steps per optimizer step that the job just ran (summed loss,
  gradients divided by the token count), so both sides do the same arithmetic.

The two are interleaved step by step (the machine is shared; drift hits both); the
medians of each side's step time and of the paired per-step ratio are reported (target
ratio <= 1.05 for baseline and logical_batch). Run: ``python benchmarks/job_overhead.py [--quick]``.

``--live``: instead, the cost of live control (docs/live_control.md): two identical jobs
interleaved step by step, one listening for ``schedany control`` in a run folder (rank
0's per-step ``listdir`` of the queue and its status file every 0.5 s), one with
``train.log_dir: null`` (not listening); the paired ratio listening / not (target <= 1.01),
and, since that ratio swims in the machine's noise, the per-step control work timed on its
own and its share of a step. Both make the trainer's one agreement per step, which costs
no collective in one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from schedany.config import load_config
from schedany.job import model as model_lib
from schedany.job.build import build_model
from schedany.job.data import MicroBatchSampler, load_corpus
from schedany.job.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
QUIET = ["train.log_dir=null", "train.checkpoint_dir=null", "train.progress=none"]


class Bare:
    """The hand-written loop: forward, backward, (divide), AdamW step."""

    def __init__(self, trainer: Trainer) -> None:
        config = trainer.config
        self.model = build_model(config)
        opt = config.optimizer
        groups = model_lib.param_groups(self.model)
        for group in groups:
            group.update((opt.param_groups or {}).get(group["name"], {}))
        self.optimizer = torch.optim.AdamW(groups, **opt.kwargs)
        sampler = trainer.sampler
        corpus = load_corpus(
            config.data.path, suffixes=config.data.suffixes, max_bytes=config.data.max_bytes
        )
        train_docs, _ = corpus.split(config.data.eval_fraction, seed=config.seed)
        self.sampler = MicroBatchSampler(
            train_docs,
            sampler.micro_batch_size,
            sampler.seq_len,
            seed=config.seed,
            min_len=sampler.min_len,
        )
        self.accumulate = config.control.kind != "none"
        self.params = [p for p in self.model.parameters()]

    def step(self, micro_steps: int) -> None:
        if not self.accumulate:
            total, n = model_lib.loss(self.model, next(self.sampler), "sum")
            (total / n).backward()
        else:
            tokens = 0
            for _ in range(micro_steps):
                batch = next(self.sampler)
                total, n = model_lib.loss(self.model, batch, "sum")
                total.backward()
                tokens += n
            with torch.no_grad():
                torch._foreach_div_([p.grad for p in self.params], tokens)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure(name: str, steps: int, warmup: int) -> tuple[float, float, float, float]:
    """Per optimizer step: the job's step, then the bare loop's step with the same
    micro-step count. Returns medians (job ms, bare ms, paired ratio) and micro/step."""
    config = load_config(EXAMPLES / f"{name}.yaml", QUIET)
    trainer = Trainer(config)
    bare = Bare(trainer)
    job_times: list[float] = []
    bare_times: list[float] = []
    micro = 0
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, count = trainer.train_step()
        job = time.perf_counter() - start
        start = time.perf_counter()
        bare.step(count)
        plain = time.perf_counter() - start
        if i >= warmup:
            job_times.append(job)
            bare_times.append(plain)
            micro += count
    ratios = [j / b for j, b in zip(job_times, bare_times)]
    return (
        statistics.median(job_times) * 1e3,
        statistics.median(bare_times) * 1e3,
        statistics.median(ratios),
        micro / steps,
    )


def measure_live(name: str, steps: int, warmup: int) -> tuple[float, float, float, float]:
    """Per optimizer step, a listening job's step and a silent twin's (which goes first
    alternates), and the listening job's per-step control work once more on its own
    (``poll``, the agreement, ``at_boundary``: what its step just did). Medians
    (listening ms, silent ms, paired ratio, control us)."""
    with tempfile.TemporaryDirectory() as run_dir:
        silent = Trainer(load_config(EXAMPLES / f"{name}.yaml", QUIET))
        listening = Trainer(
            load_config(EXAMPLES / f"{name}.yaml", [*QUIET, f"train.log_dir={run_dir}"])
        )
        listening.live.start()
        times: tuple[list[float], list[float]] = ([], [])
        control: list[float] = []
        try:
            for i in range(warmup + steps):
                pairs = list(zip((listening, silent), times))
                for trainer, kept in pairs if i % 2 else pairs[::-1]:  # neither always first
                    start = time.perf_counter()
                    trainer.train_step()
                    if i >= warmup:
                        kept.append(time.perf_counter() - start)
                start = time.perf_counter()
                listening.live.poll()
                listening.live.at_boundary(listening.flags.agree())
                if i >= warmup:
                    control.append(time.perf_counter() - start)
        finally:
            listening.live.close()
    ratios = [a / b for a, b in zip(*times)]
    on, off = (statistics.median(t) * 1e3 for t in times)
    return on, off, statistics.median(ratios), statistics.median(control) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["baseline", "logical_batch", "weight_decay", "gnts"]
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--live", action="store_true", help="the cost of listening for edits")
    args = parser.parse_args()
    steps = 20 if args.quick else 60
    if args.live:
        print(f"{'config':<15}{'listening ms':>14}{'silent ms':>11}{'ratio':>8}", end="")
        print(f"{'control us':>12}{'share':>8}")
        for name in args.configs:
            on, off, ratio, us = measure_live(name, steps, warmup=5)
            print(f"{name:<15}{on:>14.2f}{off:>11.2f}{ratio:>8.3f}{us:>12.1f}", end="")
            print(f"{us / (off * 1e3):>8.2%}")
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} optimizer "
        "steps per config, job and bare interleaved step by step; medians"
    )
    print(f"{'config':<15}{'micro/step':>11}{'job ms/step':>13}{'bare ms/step':>14}{'ratio':>8}")
    for name in args.configs:
        job, bare, ratio, micro = measure(name, steps, warmup=5)
        print(f"{name:<15}{micro:>11.2f}{job:>13.1f}{bare:>14.1f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
