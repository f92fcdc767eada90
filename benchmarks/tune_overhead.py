"""Wall time of an 8-trial sweep through the adapter vs the same training as a bare
Tune function trainable, in one Ray session.

Both sweeps train the same model on the same data with the same optimizer, schedule
and step count, evaluate and checkpoint every ``log_every`` steps and ``tune.report``
at the same cadence; the adapter adds what ``schedany tune`` gives on top
(TensorBoard and ``metrics.jsonl`` per trial, scheduled values in every report,
schedule-aware restore). Target: ratio <= 1.10.

    python benchmarks/tune_overhead.py [--steps 60] [--trials 8] [--repeats 1]

The two sweeps alternate (adapter, bare, adapter, ...) so drifting machine load hits
both; the ratio of the summed wall times is printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schedany.config import parse_config  # noqa: E402
from schedany.integrations._sweep import load_sweep  # noqa: E402
from schedany.integrations._tune_space import resolve_trial_config  # noqa: E402
from schedany.integrations.ray_tune import make_tuner, ray_session  # noqa: E402

WARMUPS = [0, 4, 8, 12, 16, 20, 24, 28]


def bare_trainable(values: dict[str, Any], *, base: dict[str, Any]) -> None:
    """The same job, written by hand as a plain Tune function trainable."""
    from ray import tune

    from schedany.job.build import build_model, build_run
    from schedany.job.data import MicroBatchSampler, eval_batches, load_corpus
    from schedany.job.model import loss

    config = resolve_trial_config(base, values)
    torch.manual_seed(config.seed)
    d, m, t = config.data, config.model, config.train
    model = build_model(config)
    optimizer, schedule = build_run(config, model)
    train_docs, eval_docs = load_corpus(d.path, suffixes=d.suffixes, max_bytes=d.max_bytes).split(
        d.eval_fraction, seed=config.seed
    )
    sampler = MicroBatchSampler(
        train_docs, t.micro_batch_size, m.seq_len, seed=config.seed, min_len=d.min_len
    )
    eval_set = eval_batches(eval_docs, d.eval_batch_size, m.seq_len, max_windows=d.eval_windows)
    window_loss = window_tokens = 0.0
    for step in range(1, t.steps + 1):
        total, n = loss(model, next(sampler), "sum")
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        window_loss += float(total.detach())
        window_tokens += n
        if step % t.log_every == 0 or step == t.steps:
            with torch.no_grad():
                sums = [loss(model, b, "sum") for b in eval_set]
            eval_loss = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "step": step,
                    },
                    os.path.join(folder, "state.pt"),
                )
                tune.report(
                    {
                        "global_step": step,
                        "train/loss": window_loss / window_tokens,
                        "eval/loss": eval_loss,
                    },
                    checkpoint=tune.Checkpoint.from_directory(folder),
                )
            window_loss = window_tokens = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=8, choices=range(1, len(WARMUPS) + 1))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="schedany-tune-bench-"))
    base = {
        "seed": 0,
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 64},
        "data": {"max_bytes": 262144, "eval_windows": 16, "eval_batch_size": 16},
        "optimizer": {"name": "AdamW", "lr": 3.0e-3, "weight_decay": 0.1},
        "schedules": {
            "lr": {
                "curve": "cosine_annealing_with_warmup",
                "warmup_to_value": 1.0,
                "anneal_to_value": 0.1,
                "num_warmup_steps": 10,
                "num_training_steps": args.steps,
            }
        },
        "train": {"steps": args.steps, "micro_batch_size": 8, "log_every": 10},
    }
    parse_config(base)
    import yaml

    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "sweep.yaml").write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "search": {"schedules.lr.num_warmup_steps": {"grid": WARMUPS[: args.trials]}},
                "tune": {"storage_path": str(root / "runs")},
            }
        )
    )
    sweep = load_sweep(root / "sweep.yaml")
    times: dict[str, list[float]] = {"adapter": [], "bare": []}
    try:
        with ray_session(None, num_cpus=os.cpu_count()) as connection:
            from ray import tune

            for _ in range(args.repeats):
                for kind in ("adapter", "bare"):
                    if kind == "adapter":
                        tuner = make_tuner(sweep, connection, verbose=0)
                    else:
                        tuner = tune.Tuner(
                            tune.with_parameters(bare_trainable, base=copy.deepcopy(sweep.base)),
                            param_space={p: d.to_tune() for p, d in sweep.search.items()},
                            tune_config=tune.TuneConfig(metric="eval/loss", mode="min"),
                            run_config=tune.RunConfig(
                                name="bare", storage_path=str(root / "runs"), verbose=0
                            ),
                        )
                    start = time.perf_counter()
                    results = tuner.fit()
                    times[kind].append(time.perf_counter() - start)
                    assert not results.errors, results.errors
                    print(
                        f"{kind:8s} {args.trials} trials x {args.steps} steps: "
                        f"{times[kind][-1]:.1f} s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = sum(times["adapter"]) / sum(times["bare"])
    print(f"ratio adapter / bare = {ratio:.3f} (target <= 1.10) on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
