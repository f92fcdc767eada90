"""The reference job on the training clock: it counts global samples and tokens per
optimizer step, stops at a token budget, and counts its cadences and TensorBoard's axis
in ``train.axis`` (docs/clock.md). Oracle: the same global batch in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _job_runs import EXAMPLES, TINY_MODEL, launch, ok, run_args, sets

from schedany.config import ConfigError, load_config
from schedany.curves import BUILTIN_CURVES
from schedany.job.trainer import train

BASELINE = str(EXAMPLES / "baseline.yaml")
SMALL = [
    *TINY_MODEL,
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.progress=none",
]
TOKENS = 2500


def lines(run: Path) -> list[dict]:
    text = (run / "logs" / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_token_budget_axis_and_cadences_in_one_process(tmp_path: Path) -> None:
    every = 600  # log every 600 tokens
    config = load_config(
        BASELINE,
        [
            *SMALL,
            "train.micro_batch_size=8",
            "train.steps=null",
            f"train.tokens={TOKENS}",
            "train.axis=tokens",
            f"train.log_every={every}",
            f"train.log_dir={tmp_path / 'logs'}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            # lr follows the token count: warmup over 500 tokens, anneal until 2500.
            "schedules.lr.unit=tokens",
            "schedules.lr.num_warmup_steps=500",
            f"schedules.lr.num_training_steps={TOKENS}",
        ],
    )
    result = train(config)
    seen = lines(tmp_path)
    clocks = [line["clock"] for line in seen]
    assert (
        [c["steps"] for c in clocks]
        == list(range(1, len(seen) + 1))
        == [line["step"] for line in seen]
    )
    assert all(c["samples"] == 8 * c["steps"] for c in clocks)  # one micro-batch of 8 rows
    tokens = [c["tokens"] for c in clocks]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))
    # The run stops after the first optimizer step at which the clock reaches the budget.
    assert tokens[-1] >= TOKENS > tokens[-2] and result.step == len(seen)
    # Each step used lr = base x curve(tokens before it), whatever the step consumed.
    curve = BUILTIN_CURVES["cosine_annealing_with_warmup"](1.0, 0.1, 500, TOKENS)
    for line, before in zip(seen, [0, *tokens]):
        assert line["schedule"]["lr"] == [3.0e-3 * curve(before)] * 2
    # Losses are logged at the steps whose tokens cross a multiple of 600, and at the end.
    logged = [line["step"] for line in seen if "train/loss" in line]
    expected = [
        step
        for step, (before, now) in enumerate(zip([0, *tokens], tokens), start=1)
        if now // every > before // every or step == len(seen)
    ]
    assert logged == expected and len(expected) >= 4
    # TensorBoard's x axis is the token count; clock/* holds the whole clock.
    events = tensorboard(tmp_path)
    assert [s for s, _ in events["schedule/lr/decay"]] == tokens
    assert [v for _, v in events["clock/tokens"]] == [float(t) for t in tokens]
    assert [v for _, v in events["clock/steps"]] == [float(c["steps"]) for c in clocks]
    assert [s for s, _ in events["train/loss"]] == [tokens[s - 1] for s in logged]


LOGICAL_BATCH = str(EXAMPLES / "logical_batch.yaml")
GNTS = str(EXAMPLES / "gnts.yaml")


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, strategy, more",
    [
        (BASELINE, "ddp", []),
        (BASELINE, "fsdp", []),
        # Decisions from sample counts alone (8 rows per micro-step either way): 16, then
        # growing to 64 rows per optimizer step.
        (LOGICAL_BATCH, "ddp", ["control.items=samples", "extend.logical_batch_size=16"]),
        # Tokens counted by the controller's own exchange, no all-reduce of the trainer's.
        (LOGICAL_BATCH, "ddp", ["extend.logical_batch_size=300"]),
        # Decisions from the global mean gradient's norm: 1 to 8 micro-steps a step.
        (GNTS, "ddp", []),
    ],
    ids=["ddp", "fsdp", "logical_batch-samples-ddp", "logical_batch-tokens-ddp", "gnts-ddp"],
)
def test_two_ranks_with_a_token_budget_stop_with_one_process_of_the_same_batch(
    tmp_path: Path, config: str, strategy: str, more: list[str]
) -> None:
    budget = [*SMALL, *more, "train.steps=null", f"train.tokens={TOKENS}", "train.log_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = launch(["train", config, *sets([*budget, "train.micro_batch_size=8"]), *run_args(one)])
    ranks = launch(
        [
            "train",
            config,
            *sets([*budget, "train.micro_batch_size=4", f"distributed.strategy={strategy}"]),
            *run_args(two),
        ],
        torchrun=["--nproc-per-node", "2"],
    )
    ok(single), ok(ranks)
    a, b = lines(one), lines(two)
    assert [line["clock"] for line in a] == [line["clock"] for line in b]  # global counts
    assert len(a) == len(b) and a[-1]["clock"]["tokens"] >= TOKENS
    assert [line["micro_steps"] for line in a] == [line["micro_steps"] for line in b]
    if config == GNTS:  # the loop reacted: some steps took more than one micro-batch
        assert max(line["micro_steps"] for line in a) > 1
    for x, y in zip(a, b):
        assert x["schedule"] == pytest.approx(y["schedule"], rel=1e-12)


def test_budget_and_axis_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^train\.tokens: expected exactly one budget"):
        load_config(BASELINE, ["train.tokens=100"])  # baseline.yaml sets train.steps
    with pytest.raises(ConfigError, match=r"^train: expected exactly one budget .*got none"):
        load_config(BASELINE, ["train.steps=null"])
    with pytest.raises(ConfigError, match=r"^train\.axis: expected one of steps, samples, tokens"):
        load_config(BASELINE, ["train.axis=epochs"])
    with pytest.raises(ConfigError, match=r"^train\.samples: expected an integer >= 1, got 0"):
        load_config(BASELINE, ["train.steps=null", "train.samples=0"])
