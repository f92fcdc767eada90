"""``schedany`` command line: train, preview, tune, validate, control.

A thin layer over the library: every command loads its config with
:func:`schedany.config.load_config` and hands it to a library function. Exit codes:
0 success, 2 a bad config or bad arguments (one line naming the path, no traceback),
1 a failed run, 143 a preempted one (``schedany train`` checkpointed the step at which a
SIGTERM or SIGUSR1 arrived; docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, get_args

from ._clock import UNITS
from .curves import DecayShape

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_PREEMPTED = 143
"""128 + SIGTERM, the shell's code for "ended by SIGTERM": schedulers retry it (Kubeflow's
``ExitCode`` restart policy retries 128-255 and treats 1 as permanent)."""


def _positive_int(text: str) -> int:
    """``--steps N`` / ``--num-samples N``: the library's rule for a count, on the text."""
    from .errors import ArgumentError, check_integer

    try:
        value: object = int(text)
    except ValueError:
        value = text
    try:
        return check_integer(value, "N", min=1)
    except ArgumentError as error:
        raise argparse.ArgumentTypeError(
            f"expected {error.expected}, got {error.value!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="schedany",
        description="Schedule any optimizer hyperparameter; train, preview, tune and "
        "validate schedule configs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config field, e.g. --set train.steps=100 "
            "(VALUE is parsed as YAML); repeatable",
        )

    p = sub.add_parser("train", help="run the reference training job (distributed under torchrun)")
    p.add_argument("config", metavar="CONFIG", help="train config (YAML)")
    p.add_argument(
        "--from",
        dest="from_checkpoint",
        metavar="CHECKPOINT",
        help="start from another run's checkpoint (a step_N folder, or a checkpoint "
        "folder: its newest): model, optimizer state, data position and clock from it, "
        "schedules from CONFIG at its clock",
    )
    overrides(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("preview", help="compute every scheduled value without training")
    p.add_argument("config", metavar="CONFIG", help="train config (YAML)")
    p.add_argument("-o", "--output", metavar="FILE.png", help="plot to this file")
    p.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="optimizer steps to preview (default: the budget); with --unit, the points",
    )
    p.add_argument(
        "--unit",
        choices=UNITS,
        default="steps",
        help="what the x axis counts (default: steps)",
    )
    p.add_argument("--tensorboard", metavar="DIR", help="also write the curves to TensorBoard")
    overrides(p)
    p.set_defaults(func=_preview)

    p = sub.add_parser("tune", help="Ray Tune sweep over schedule hyperparameters")
    p.add_argument("sweep", metavar="SWEEP", help="sweep file (YAML: base, search, tune)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: local)")
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        metavar="N",
        help="trials to run (overrides tune.num_samples)",
    )
    p.set_defaults(func=_tune)

    p = sub.add_parser("control", help="steer a running job: status, set, cooldown, stop")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.log_dir")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "status", help="step, clock, scheduled values, pending and applied edits"
    )
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a = actions.add_parser("set", help="change schedules.* or the train budget, like --set")
    a.add_argument("sets", nargs="+", metavar="PATH=VALUE")
    a = actions.add_parser("cooldown", help="take a scheduled key to a value over N units")
    a.add_argument("target", metavar="TARGET", help="a scheduled key (lr, weight_decay, ...)")
    a.add_argument(
        "--over",
        type=_positive_int,
        required=True,
        metavar="N",
        help="units of the key's schedule (its unit: steps, samples or tokens)",
    )
    a.add_argument(
        "--to",
        type=float,
        metavar="V",
        help="the value to end at (default: the schedule's anneal_to_value)",
    )
    a.add_argument("--shape", choices=get_args(DecayShape), default="linear")
    actions.add_parser("stop", help="checkpoint, then exit 0 (the same train command resumes)")
    p.set_defaults(func=_control)

    p = sub.add_parser("validate", help="check a config and print the resolved schedule")
    p.add_argument("config", metavar="CONFIG", help="train config (YAML)")
    p.add_argument("--yaml", action="store_true", help="also print the whole resolved config")
    overrides(p)
    p.set_defaults(func=_validate)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)
    from .job.checkpoint import CheckpointError
    from .job.trainer import Preempted, RankFailure, train

    try:
        result = train(config, from_checkpoint=args.from_checkpoint)
    except CheckpointError as exc:
        _error("train", str(exc))
        return EXIT_FAILED
    except RankFailure as exc:
        traceback.print_exc()  # the cause may be a bug rather than a lost rank
        _error("train", str(exc))
        return EXIT_FAILED
    except Preempted as exc:
        if _is_rank0():
            print(exc, flush=True)  # "preempted at step N (checkpoint ...)"
        return EXIT_PREEMPTED
    if result.stopped and _is_rank0():
        print(f"stopped at step {result.step}; the same command resumes", flush=True)
    elif result.eval_loss is not None and _is_rank0():
        print(f"done: {result.step} steps, eval/loss {result.eval_loss:.4f}", flush=True)
    return EXIT_OK


def _control(args: argparse.Namespace) -> int:
    import json

    from .job import control

    if args.action == "status":
        info = control.status(args.run_dir)
        if args.json:
            print(json.dumps(info))
        else:
            print("\n".join(control.format_status(info)))
        if not info["listening"]:
            _error("control", info["why_not"])
            return EXIT_FAILED
        return EXIT_OK
    request = control.make_request(
        args.action,
        sets=getattr(args, "sets", ()),
        target=getattr(args, "target", None),
        over=getattr(args, "over", None),
        to=getattr(args, "to", None),
        shape=getattr(args, "shape", "linear"),
    )
    try:
        name = control.control_command(args.run_dir, request)
    except control.NotListening as exc:
        _error("control", str(exc))
        return EXIT_FAILED
    print(f"queued {name}: {request.command}; the run applies it after its next optimizer step")
    return EXIT_OK


def _preview(args: argparse.Namespace) -> int:
    from .preview import preview_command

    return preview_command(
        args.config, args.output, args.steps, args.tensorboard, args.overrides, args.unit
    )


def _tune(args: argparse.Namespace) -> int:
    try:
        from .integrations.ray_tune import tune_command
    except ImportError as exc:
        _error("tune", f"the Ray Tune adapter cannot load ({exc}); pip install 'schedany[tune]'")
        return EXIT_FAILED
    return tune_command(args.sweep, args.address, args.num_samples)


def _validate(args: argparse.Namespace) -> int:
    import yaml

    from .config import config_to_dict, load_config
    from .preview import trace

    config = load_config(args.config, args.overrides)
    steps = config.train.steps
    if steps is None or any(spec.unit != "steps" for spec in config.schedules.values()):
        # Built once to check it; values per optimizer step depend on the data here.
        from ._clock import Clock
        from .config import build_run

        build_run(config, clock=Clock())
        unit, budget = config.train.budget()
        print(f"{args.config}: valid ({budget} {unit}; schedules follow the training clock)")
        return EXIT_OK
    result = trace(config)
    labels, values = result.groups, result.values
    marks = sorted({1, max(1, steps // 4), max(1, steps // 2), max(1, 3 * steps // 4), steps})
    print(f"{args.config}: valid")
    opt = config.optimizer
    groups = ", ".join(labels)
    print(f"optimizer  {opt.name}({_kwargs(opt.kwargs)}); param groups: {groups}")
    if config.extend:
        print(f"extend     {_kwargs(config.extend)}")
    control = config.control
    if control.kind == "none":
        print("control    none (one micro-batch per rank per optimizer step)")
    else:
        limit = (
            f", at most {control.max_accumulation_steps} micro-steps"
            if control.max_accumulation_steps
            else ""
        )
        print(f"control    {control.kind} on {config.control_key()!r} ({control.items}{limit})")
    t = config.train
    print(
        f"train      {steps} optimizer steps, micro-batch {t.micro_batch_size}, strategy "
        f"{config.distributed.strategy}, checkpoints "
        f"{t.checkpoint_dir or 'off'}, logs {t.log_dir or 'off'}"
    )
    print("schedules")
    for name, spec in config.schedules.items():
        print(f"  {name}: {spec.kind} {spec.name}({_kwargs(spec.args)})")
    header = ["key", "group"] + [f"step {m}" for m in marks]
    rows = [
        [name, label] + [f"{values[name][m - 1][g]:.6g}" for m in marks]
        for name in values
        for g, label in enumerate(labels)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("  value used by each optimizer step:")
    for row in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if args.yaml:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return EXIT_OK


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in kwargs.items())


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _error(command: str, message: str) -> None:
    # One line, whatever the message quotes from a file or --set (a newline, a \r, ...).
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)
    print(f"schedany {command}: error: {shown}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        _error(args.command, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        _error(args.command, "failed (traceback above)")
        return EXIT_FAILED
