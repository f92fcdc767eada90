"""The training clock: schedules that count samples or tokens stay on their curve whatever
each optimizer step consumes (docs/clock.md). Oracles: the pure curve evaluated at the
clock's reading, and the same stock scheduler on ``lr`` stepped ``reading // every`` times."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import random

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, OneCycleLR, StepLR

import schedany
from schedany import Clock, SynchronousSchedule, arbitrary_schedule_factory
from schedany.config import ConfigError, build_schedule
from schedany.curves import BUILTIN_CURVES

ARGS = dict(
    warmup_to_value=0.9,
    anneal_to_value=0.1,
    num_warmup_steps=500,
    num_training_steps=4000,
    polynomial_exponent=1.7,
    warmup_multiplier=3.0,
    value=0.7,
    num_decay_steps=1500,
    decay_shape="cosine",
)


def adamw(lr: float = 1.0) -> torch.optim.AdamW:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    return torch.optim.AdamW(
        [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.3}], lr=lr
    )


def irregular_counts(steps: int, seed: int = 0) -> list[tuple[int, int]]:
    """(samples, tokens) per optimizer step, as a reactive loop produces them."""
    rng = random.Random(seed)
    return [(rng.randint(1, 64), rng.choice([0, 1, 7, 130, 333, 1024])) for _ in range(steps)]


def curve_args(name: str) -> dict[str, float]:
    params = inspect.signature(BUILTIN_CURVES[name]).parameters
    return {k: ARGS[k] for k in params}


@pytest.mark.parametrize("name", list(BUILTIN_CURVES))
def test_builtin_on_tokens_is_its_curve_at_the_clock(name: str) -> None:
    opt = adamw(lr=2.0)
    clock = Clock()
    built = getattr(schedany, name)(opt, **curve_args(name), unit="tokens")
    schedule = SynchronousSchedule([built], clock=clock)
    curve = BUILTIN_CURVES[name](**curve_args(name))
    assert schedule.get_last_lr() == [2.0 * curve(0)] * 2
    for samples, tokens in irregular_counts(60):
        opt.step()
        clock.advance(samples=samples, tokens=tokens)
        schedule.step()
        assert schedule.get_last_lr() == [2.0 * curve(clock.tokens)] * 2, clock
    assert clock.tokens > ARGS["num_training_steps"]  # the run crossed warmup, anneal, tail


@pytest.mark.parametrize(
    "factory",
    [
        lambda o: StepLR(o, step_size=3, gamma=0.5),
        lambda o: CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2, eta_min=0.01),
        lambda o: OneCycleLR(o, max_lr=1.0, total_steps=200, cycle_momentum=False),
    ],
    ids=["StepLR", "CosineAnnealingWarmRestarts", "OneCycleLR"],
)
def test_bound_stock_scheduler_on_samples_steps_once_per_every(factory) -> None:
    every = 16
    opt = adamw()
    clock = Clock()
    bound = arbitrary_schedule_factory(
        opt, factory, schedule_target="weight_decay", unit="samples", every=every
    )
    schedule = SynchronousSchedule([bound], clock=clock)
    # The same scheduler on lr, from the same base values (each group's weight_decay).
    reference_opt = adamw()
    for group, base in zip(reference_opt.param_groups, (0.01, 0.3)):
        group["lr"] = base
    reference = factory(reference_opt)
    taken = 0
    for samples, tokens in irregular_counts(50, seed=1):
        opt.step()
        clock.advance(samples=samples, tokens=tokens)
        schedule.step()
        while taken < clock.samples // every:
            reference_opt.step()
            reference.step()
            taken += 1
        assert schedule.get_last_schedule("weight_decay") == reference.get_last_lr()
        assert [g["weight_decay"] for g in opt.param_groups] == reference.get_last_lr()
    assert taken > 20


def mixed(opt: torch.optim.Optimizer, clock: Clock) -> SynchronousSchedule:
    return SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(opt, 1.0, 0.1, 3, 30),  # optimizer steps
            schedany.linear_schedule_with_warmup(
                opt, 1.0, 0.0, 200, 2000, schedule_target="weight_decay", unit="tokens"
            ),
            arbitrary_schedule_factory(
                opt,
                lambda o: StepLR(o, step_size=2, gamma=0.5),
                schedule_target="betas[0]",
                unit="samples",
                every=10,
            ),
        ],
        clock=clock,
    )


def run(schedule: SynchronousSchedule, opt, clock: Clock, counts) -> list[dict[str, list]]:
    seen = []
    for samples, tokens in counts:
        opt.step()
        clock.advance(samples=samples, tokens=tokens)
        schedule.step()
        seen.append({n: schedule.get_last_schedule(n) for n in schedule.schedule_names})
    return seen


def test_units_mix_in_one_coordinator() -> None:
    opt, clock = adamw(), Clock()
    schedule = mixed(opt, clock)
    lr = BUILTIN_CURVES["cosine_annealing_with_warmup"](1.0, 0.1, 3, 30)
    wd = BUILTIN_CURVES["linear_schedule_with_warmup"](1.0, 0.0, 200, 2000)
    for step, (samples, tokens) in enumerate(irregular_counts(25, 2), start=1):
        opt.step()
        clock.advance(samples=samples, tokens=tokens)
        schedule.step()
        assert schedule.get_last_lr() == [lr(step)] * 2
        # Each group: its own base value times the curve at the clock's reading.
        assert schedule.get_last_schedule("weight_decay") == [
            0.01 * wd(clock.tokens),
            0.3 * wd(clock.tokens),
        ]
        assert schedule.get_last_schedule("betas[0]") == [0.9 * 0.5 ** (clock.samples // 20)] * 2
    assert clock.samples // 10 > 10 and clock.tokens > 2000


def test_resume_mid_run_equals_the_uninterrupted_run() -> None:
    counts = irregular_counts(40, seed=3)
    opt, clock = adamw(), Clock()
    uninterrupted = run(mixed(opt, clock), opt, clock, counts)

    opt, clock = adamw(), Clock()
    first = mixed(opt, clock)
    head = run(first, opt, clock, counts[:17])
    state = copy.deepcopy(first.state_dict())
    optimizer_state = copy.deepcopy(opt.state_dict())
    assert state["clock"] == clock.state_dict()

    opt2, clock2 = adamw(), Clock()
    resumed = mixed(opt2, clock2)
    opt2.load_state_dict(optimizer_state)
    resumed.load_state_dict(state)
    assert clock2.state_dict() == clock.state_dict()
    tail = run(resumed, opt2, clock2, counts[17:])
    assert head + tail == uninterrupted


def test_errors_name_the_member_and_the_unit() -> None:
    opt = adamw()
    token_lr = schedany.constant_schedule(opt, 1.0, unit="tokens")
    with pytest.raises(ValueError, match=r"schedules\[0\] \('lr'\) steps once per 1 tokens.*clock"):
        SynchronousSchedule([token_lr])
    with pytest.raises(
        ValueError, match=r"requires unit to be one of steps, samples, tokens, got unit='tokenz'"
    ):
        schedany.constant_schedule(adamw(), 1.0, unit="tokenz")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"requires every to be an integer >= 1, got every=0"):
        arbitrary_schedule_factory(adamw(), lambda o: StepLR(o, 2), unit="samples", every=0)
    clock = Clock()
    schedule = SynchronousSchedule(
        [schedany.constant_schedule(opt, 1.0, unit="tokens")], clock=clock
    )
    opt.step()
    clock.advance(tokens=10)
    schedule.step()
    clock.load_state_dict({"steps": 1, "samples": 0, "tokens": 3})
    with pytest.raises(
        ValueError, match=r"schedule 'lr' .* clock reads 3 tokens: the clock went backwards"
    ):
        schedule.step()


def test_clock_rejects_bad_counts_and_states() -> None:
    clock = Clock()
    with pytest.raises(ValueError, match=r"Clock.advance requires samples to be an integer >= 0"):
        clock.advance(samples=-1)
    with pytest.raises(
        TypeError, match=r"Clock.advance requires tokens to be an integer >= 0, got tokens=2.5"
    ):
        clock.advance(tokens=2.5)  # type: ignore[arg-type]
    assert clock.state_dict() == {"steps": 0, "samples": 0, "tokens": 0}  # nothing counted
    with pytest.raises(ValueError, match=r"Clock.read requires unit to be one of"):
        clock.read("epochs")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"expected keys \['samples', 'steps', 'tokens'\]"):
        clock.load_state_dict({"steps": 1})
    opt = adamw()
    with_clock = SynchronousSchedule([schedany.constant_schedule(opt, 1.0)], clock=Clock())
    without = SynchronousSchedule([schedany.constant_schedule(adamw(), 1.0)])
    with pytest.raises(KeyError, match="the state has no clock, this schedule has one"):
        with_clock.load_state_dict(without.state_dict())
    with pytest.raises(KeyError, match="the state holds a clock, this schedule has none"):
        without.load_state_dict(with_clock.state_dict())


def test_config_units() -> None:
    spec = {
        "schedules": {
            "lr": {
                "curve": "linear_schedule_with_warmup",
                "warmup_to_value": 1.0,
                "anneal_to_value": 0.0,
                "num_warmup_steps": 100,
                "num_training_steps": 1000,
                "unit": "tokens",
            },
            "weight_decay": {"scheduler": "StepLR", "step_size": 1, "unit": "samples", "every": 8},
        }
    }
    with pytest.raises(ConfigError, match=r"^schedules\.lr\.unit: a schedule counting 1 tokens"):
        build_schedule(adamw(), spec)
    opt, clock = adamw(), Clock()
    schedule = build_schedule(opt, spec, clock=clock)
    opt.step()
    clock.advance(samples=17, tokens=250)
    schedule.step()
    assert schedule.get_last_lr() == [1.0 - 150 / 900] * 2  # 250 tokens: p = 150 / 900
    assert schedule.get_last_schedule("weight_decay") == [
        0.01 * 0.1 * 0.1,
        0.3 * 0.1 * 0.1,
    ]  # 17 // 8 StepLR steps
    bad = copy.deepcopy(spec)
    bad["schedules"]["lr"]["unit"] = "tokenz"
    with pytest.raises(
        ConfigError,
        match=r"^schedules\.lr\.unit: expected one of steps, samples, tokens, got 'tokenz'",
    ):
        build_schedule(adamw(), bad, clock=Clock())
    bad = copy.deepcopy(spec)
    bad["schedules"]["weight_decay"]["every"] = 0
    with pytest.raises(
        ConfigError, match=r"^schedules\.weight_decay\.every: expected an integer >= 1, got 0"
    ):
        build_schedule(adamw(), bad, clock=Clock())


# --- preview --unit ------------------------------------------------------------------

PREVIEW = """\
optimizer: {name: AdamW, lr: 2.0, weight_decay: 0.1}
schedules:
  lr: {curve: linear_schedule_with_warmup, warmup_to_value: 1.0, anneal_to_value: 0.0,
       num_warmup_steps: 100, num_training_steps: 1000, unit: tokens}
train: {steps: null, tokens: 1000, micro_batch_size: 4}
"""


def write_config(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_preview_in_tokens_is_each_curve_at_the_span_start(tmp_path, capsys) -> None:
    from schedany.cli import main
    from schedany.config import load_config
    from schedany.preview import trace

    path = write_config(tmp_path, PREVIEW)
    result = trace(load_config(path), 10, unit="tokens")
    assert result.axis == tuple(range(100, 1001, 100))
    curve = BUILTIN_CURVES["linear_schedule_with_warmup"](1.0, 0.0, 100, 1000)
    assert [row[0] for row in result.values["lr"]] == [2.0 * curve(x - 100) for x in result.axis]
    assert main(["preview", str(path), "--unit", "tokens", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "1000 tokens in 4 spans" in out
    assert out.splitlines()[1].split() == ["tokens", "lr/pg0"]
    assert out.splitlines()[3].split() == ["500", f"{2.0 * (1 - 150 / 900):.6g}"]
    # Counted in steps, the config does not fix where a token schedule is: exit 2.
    assert main(["preview", str(path)]) == 2
    err = capsys.readouterr().err
    assert "schedules.lr.unit: counts tokens" in err and "(--unit steps)" in err


def test_preview_refuses_a_step_schedule_on_a_token_axis(tmp_path) -> None:
    from schedany.config import load_config
    from schedany.preview import trace

    text = PREVIEW + "  # and a schedule in optimizer steps\n"
    text = text.replace("train:", "  weight_decay: {curve: constant_schedule, value: 0.5}\ntrain:")
    with pytest.raises(
        ConfigError, match=r"^schedules\.weight_decay\.unit: counts steps, .* \(--unit tokens\)"
    ):
        trace(load_config(write_config(tmp_path, text)), unit="tokens")


def test_preview_in_samples_without_a_controller_places_step_schedules(tmp_path) -> None:
    from schedany.config import load_config
    from schedany.preview import trace

    text = """\
optimizer: {name: AdamW, lr: 1.0, weight_decay: 0.1}
schedules:
  lr: {curve: cosine_annealing_with_warmup, warmup_to_value: 1.0, anneal_to_value: 0.1,
       num_warmup_steps: 2, num_training_steps: 10}
  weight_decay: {scheduler: StepLR, step_size: 1, gamma: 0.5, unit: samples, every: 6}
train: {steps: 10, micro_batch_size: 4}
"""
    result = trace(load_config(write_config(tmp_path, text)), unit="samples")
    assert result.axis == tuple(range(4, 41, 4))  # 4 rows per optimizer step, one process
    lr = BUILTIN_CURVES["cosine_annealing_with_warmup"](1.0, 0.1, 2, 10)
    assert [row[0] for row in result.values["lr"]] == [lr(s) for s in range(10)]
    wd = [row[0] for row in result.values["weight_decay"]]
    assert wd == [0.1 * 0.5 ** ((x - 4) // 6) for x in result.axis]


LOGICAL_BATCH_IN_SAMPLES = """\
optimizer: {name: AdamW, lr: 1.0, weight_decay: 0.1}
extend: {logical_batch_size: 1}
schedules:
  logical_batch_size: {curve: linear_schedule_with_warmup, warmup_to_value: 20.0,
                       anneal_to_value: 20.0, num_warmup_steps: 5, num_training_steps: 10}
  lr: {curve: linear_schedule_with_warmup, warmup_to_value: 1.0, anneal_to_value: 0.0,
       num_warmup_steps: 8, num_training_steps: 100, unit: samples}
control: {kind: logical_batch, items: samples}
train: {steps: null, samples: 100, micro_batch_size: 6}
"""


def test_preview_in_samples_follows_a_scheduled_logical_batch(tmp_path) -> None:
    """A logical batch counted in samples with a fixed micro-batch fixes each step's
    samples: whole micro-batches up to that step's target (what the controller does)."""
    from schedany.config import load_config
    from schedany.preview import trace

    result = trace(load_config(write_config(tmp_path, LOGICAL_BATCH_IN_SAMPLES)), unit="samples")
    targets = [row[0] for row in result.values["logical_batch_size"]]
    per_step = [max(1, math.ceil(t / 6)) * 6 for t in targets]
    assert per_step[:2] == [6, 6] and per_step[-1] == 24  # it grows with the schedule
    assert list(result.axis) == list(itertools.accumulate(per_step))
    assert result.axis[-2] < 100 <= result.axis[-1]  # up to the samples budget
    lr = BUILTIN_CURVES["linear_schedule_with_warmup"](1.0, 0.0, 8, 100)
    starts = [0, *result.axis[:-1]]  # a step uses the value at the clock it starts from
    assert [row[0] for row in result.values["lr"]] == [lr(x) for x in starts]
    # Counted in steps too: the samples-unit lr is placed on each optimizer step.
    assert trace(load_config(write_config(tmp_path, LOGICAL_BATCH_IN_SAMPLES))).values == (
        result.values
    )


def test_preview_refuses_what_gnts_leaves_open(tmp_path) -> None:
    from schedany.config import load_config
    from schedany.preview import trace

    text = LOGICAL_BATCH_IN_SAMPLES.replace(
        "logical_batch_size", "gradient_norm_threshold"
    ).replace("kind: logical_batch, items: samples", "kind: gnts")
    with pytest.raises(ConfigError, match=r"^schedules\.lr\.unit: counts samples, .*--unit steps"):
        trace(load_config(write_config(tmp_path, text)))
    with pytest.raises(ConfigError, match=r"^schedules\.gradient_norm_threshold\.unit: counts "):
        trace(load_config(write_config(tmp_path, text)), unit="samples")
