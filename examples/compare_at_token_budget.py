"""The paper's case studies (and WSD) at one token budget, so their eval losses compare.

Counted in optimizer steps, a GNTS or logical-batch run sees several times the data of
the baseline by "step 80"; here every run stops at the same number of tokens, and every
schedule is stretched onto that budget by counting tokens too (docs/clock.md):

    python examples/compare_at_token_budget.py [--tokens 80000]

Each config's schedule lengths (L, M, D) are rescaled from its own steps budget to the
token budget, ``unit: tokens`` is set on every schedule, and the cadences count tokens.
Logs go to runs/compare/<name> (``tensorboard --logdir runs/compare``, x axis: tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from schedany.config import load_config
from schedany.job.trainer import train

EXAMPLES = Path(__file__).resolve().parent / "configs"
NAMES = ["baseline", "weight_decay", "logical_batch", "gnts", "wsd"]
LENGTHS = ("num_warmup_steps", "num_training_steps", "num_decay_steps")


def at_token_budget(name: str, tokens: int) -> list[str]:
    """``--set`` overrides that put config ``name`` on a budget of ``tokens``."""
    config = load_config(EXAMPLES / f"{name}.yaml")
    steps = config.train.steps
    if steps is None:
        raise SystemExit(f"{name}.yaml: expected a train.steps budget to rescale")
    per_step = tokens / steps  # the token length of one of the config's own steps
    overrides = [
        "train.steps=null",
        f"train.tokens={tokens}",
        "train.axis=tokens",
        f"train.log_every={tokens // 10}",
        f"train.eval_every={tokens // 2}",
        "train.checkpoint_dir=null",
        f"train.log_dir=runs/compare/{name}",
        "train.progress=none",
    ]
    for key, spec in config.schedules.items():
        overrides.append(f"schedules.{key}.unit=tokens")
        for arg in LENGTHS:
            if arg in spec.args:
                overrides.append(f"schedules.{key}.{arg}={round(spec.args[arg] * per_step)}")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=80_000, help="the token budget")
    args = parser.parse_args()
    rows = []
    for name in NAMES:
        config = load_config(EXAMPLES / f"{name}.yaml", at_token_budget(name, args.tokens))
        result = train(config)
        rows.append((name, result.step, result.eval_loss))
        print(f"{name}: {result.step} optimizer steps, eval/loss {result.eval_loss:.4f}")
    print(f"\n| config | optimizer steps | eval/loss at {args.tokens} tokens |")
    print("|---|---|---|")
    for name, steps, loss in rows:
        print(f"| {name} | {steps} | {loss:.4f} |")


if __name__ == "__main__":
    main()
