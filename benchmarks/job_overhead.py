"""Optimizer-step time of the reference job against a bare hand-written loop.

For each example config, in one process:

- job:  ``schedany.job.trainer.Trainer`` built from the config (schedules, controller,
  per-step recording), timed over ``train_step()`` (what ``run()`` does each step when
  no log, eval or checkpoint is due);
- bare: the same model shape, corpus, sampler and AdamW param groups in a loop written by
  hand: no schedules, no controller, no recording. For an accumulating config it runs
  exactly the micro-steps per optimizer step that the job just ran (summed loss,
  gradients divided by the token count; for GNTS, the gradient norm after each
  micro-step that its decision needs), so both sides do the same arithmetic.

The two are interleaved step by step (the machine is shared; drift hits both); the
medians of each side's step time and of the paired per-step ratio are reported (target
ratio <= 1.05 for baseline and logical_batch).

Then each feature against the same job without it (target ratio <= 1.02), two Trainers
from the same config and seed, interleaved step by step:

- ``clip``: ``guard.clip_key`` on baseline, a scheduled per-group threshold that clips
  (one norm pass per step, one in-place scale per clipped group);
- ``clip+skip``: the same with ``guard.skip_key`` too (never reached: the same norms);
- ``noise(logical_batch)``, ``noise(gnts)``: ``control.noise_scale=true`` (one process:
  a norm pass at the first micro-step and at the close for LogicalBatchSize; nothing for
  GNTS, whose norms are measured anyway).

On a shared machine the paired ratio of two whole steps drifts by more than the 2 %
asked, so the feature's own work is also timed alone, on live gradients (``own ms``:
the guard's ``apply()``; the noise scale's two norm passes), and reported as
``1 + own / without``, the bound that does not depend on the neighbours.

Run: ``python benchmarks/job_overhead.py [--quick] [--live]``.

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
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from schedany.config import load_config
from schedany.control import LogicalBatchSize
from schedany.job import model as model_lib
from schedany.job.build import build_model
from schedany.job.data import MicroBatchSampler, load_corpus
from schedany.job.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
QUIET = ["train.log_dir=null", "train.checkpoint_dir=null", "train.progress=none"]
CLIP = ["extend.gradient_clip_threshold=0.5", "guard.clip_key=gradient_clip_threshold"]
FEATURES = {  # name: (example config, the feature's overrides)
    "clip": ("baseline", CLIP),
    "clip+skip": (
        "baseline",
        [*CLIP, "extend.gradient_skip_threshold=1.0e6", "guard.skip_key=gradient_skip_threshold"],
    ),
    "noise(logical_batch)": ("logical_batch", ["control.noise_scale=true"]),
    "noise(gnts)": ("gnts", ["control.noise_scale=true"]),
}


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
        # A hand-written GNTS loop measures the accumulated gradient's norm after every
        # micro-step to decide (one norm pass, as the job's controller makes).
        self.measure_norm = config.control.kind == "gnts"
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
                if self.measure_norm:
                    torch.nn.utils.get_total_norm([p.grad for p in self.params])
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


def own_cost_ms(trainer: Trainer, reps: int = 50) -> float:
    """The feature's own work per optimizer step, timed alone on one micro-batch's live
    gradients (restored before each repetition): the guard's ``apply()``, or the noise
    scale's two norm passes (LogicalBatchSize in one process; GNTS adds none)."""
    total, n = model_lib.loss(trainer.model, next(trainer.sampler), "sum")
    (total / n).backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    saved = [g.clone() for g in grads]
    times = []
    for _ in range(reps):
        with torch.no_grad():
            torch._foreach_copy_(grads, saved)
        start = time.perf_counter()
        if trainer.guard is not None:
            trainer.guard.apply()
        elif isinstance(trainer.controller, LogicalBatchSize):
            torch.nn.utils.get_total_norm(grads)
            torch.nn.utils.get_total_norm(grads)
        times.append(time.perf_counter() - start)
    trainer.optimizer.zero_grad(set_to_none=True)
    return statistics.median(times) * 1e3


def measure_feature(name: str, steps: int, warmup: int) -> tuple[float, float, float, float, float]:
    """Per optimizer step: the job with the feature and the job without it, interleaved.

    Two such pairs, built in opposite orders (with, without; then without, with): two
    identical trainers in one process differ by up to ~15 % depending on which was built
    first (measured here, A against A), and the geometric mean of the two pairs' median
    ratios cancels that. Returns the medians over both pairs (with ms, without ms), that
    ratio, micro-steps per step (with) and the feature's own ms (:func:`own_cost_ms`)."""
    config_name, overrides = FEATURES[name]
    path = EXAMPLES / f"{config_name}.yaml"
    times: tuple[list[float], list[float]] = ([], [])
    ratios: list[float] = []
    micro = 0
    for with_first in (True, False):
        built = {}
        for feature in (with_first, not with_first):
            built[feature] = Trainer(load_config(path, [*QUIET, *(overrides if feature else [])]))
        pair: tuple[list[float], list[float]] = ([], [])
        for i in range(warmup + steps):
            # Which goes first alternates too: the second of a pair runs on warmer caches.
            for feature in (True, False) if i % 2 == 0 else (False, True):
                start = time.perf_counter()
                _, count = built[feature].train_step()
                if i >= warmup:
                    pair[0 if feature else 1].append(time.perf_counter() - start)
                    micro += count if feature else 0
        ratios.append(statistics.median(a / b for a, b in zip(*pair)))
        times[0].extend(pair[0])
        times[1].extend(pair[1])
    return (
        statistics.median(times[0]) * 1e3,
        statistics.median(times[1]) * 1e3,
        math.sqrt(ratios[0] * ratios[1]),
        micro / (2 * steps),
        own_cost_ms(built[True]),
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
                listening.live.at_boundary(listening.flags.agree().raised)
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
        "--configs", nargs="*", default=["baseline", "logical_batch", "weight_decay", "gnts"]
    )
    parser.add_argument("--features", nargs="*", default=list(FEATURES), help="of FEATURES")
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
    if args.features:
        print(
            f"\n{'feature':<22}{'micro/step':>11}{'with ms':>10}{'without ms':>12}{'ratio':>8}"
            f"{'own ms':>9}{'1+own/without':>15}"
        )
    for name in args.features:
        with_ms, without_ms, ratio, micro, own = measure_feature(name, steps, warmup=5)
        print(
            f"{name:<22}{micro:>11.2f}{with_ms:>10.1f}{without_ms:>12.1f}{ratio:>8.3f}"
            f"{own:>9.3f}{1 + own / without_ms:>15.4f}"
        )


if __name__ == "__main__":
    main()
