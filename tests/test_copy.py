"""Copies of an optimizer and its schedule step on their own, exactly like the original.

Invariant: ``copy.deepcopy((optimizer, schedule))`` and a whole-object ``torch.save`` /
``torch.load(weights_only=False)`` round trip give a pair whose every later value equals
the original's (and an uncopied run's), for the built-ins, every stock torch scheduler
bound to a target, and ``SynchronousSchedule``; copying and stepping the copy leave the
original as it was (docs/api.md).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import AdamW
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import SWALR

import schedany
from schedany.curves import BUILTIN_CURVES

BEFORE, AFTER = 5, 12  # steps before the copy, steps of the copy and of the original


def torch_round_trip(pair: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "torch.save": torch_round_trip,
}


# Module-level callables, so that the stock schedulers holding them can be pickled.
def decay(t: int) -> float:
    return 0.97**t


def keep(t: int) -> float:
    return 0.99


def metric(t: int) -> float:
    return 1.0 / (1 + t // 3)


STOCK = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, decay),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, keep),
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 7, 11], gamma=0.3),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.25, total_iters=8),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=10),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=15, power=1.5),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=9, eta_min=0.001),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2),
    "CyclicLR": lambda o: lrs.CyclicLR(
        o, base_lr=0.01, max_lr=0.5, step_size_up=3, mode="triangular2", cycle_momentum=False
    ),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.5, total_steps=30, cycle_momentum=False),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, 0.2, total_iters=4), lrs.ExponentialLR(o, 0.9)], milestones=[4]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, 0.5, total_iters=6), lrs.ExponentialLR(o, 0.95)]
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SWALR": lambda o: SWALR(o, swa_lr=0.01, anneal_epochs=20),
}

KEYS = ("lr", "weight_decay", "betas", "clip")


def make_optimizer() -> AdamW:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    optimizer = AdamW(
        [
            {"params": [params[0]], "lr": 0.1, "weight_decay": 0.3},
            {"params": [params[1]], "lr": 0.2, "weight_decay": 0.2, "betas": (0.8, 0.99)},
            {"params": [params[2]], "lr": 0.3, "weight_decay": 0.1},
        ]
    )
    schedany.extend_optimizer(optimizer, "clip", 2.0)
    return optimizer


def values(optimizer: torch.optim.Optimizer, schedule: lrs.LRScheduler) -> dict[str, Any]:
    """Everything a step produces: the optimizer's keys, and what the schedule reports."""
    out: dict[str, Any] = {k: [g[k] for g in optimizer.param_groups] for k in KEYS}
    out["last"] = list(schedule.get_last_lr())
    if isinstance(schedule, schedany.SynchronousSchedule):
        out["members"] = {n: schedule.get_last_schedule(n) for n in schedule.schedule_names}
    return out


def step(optimizer: torch.optim.Optimizer, schedule: Any, t: int, clock: Any = None) -> None:
    """One training step. At ``t = BEFORE + 3`` the weight decay is changed by hand before
    the optimizer step: a chainable schedule re-reads it after that step only if the
    proxy's hooks sit on this very optimizer."""
    if t == BEFORE + 3:
        optimizer.param_groups[0]["weight_decay"] = 0.05
    optimizer.step()
    if clock is not None:
        clock.advance(samples=4, tokens=[3, 1, 7, 2][t % 4])
    plateau = isinstance(schedule, lrs.ReduceLROnPlateau) or (
        isinstance(schedule, schedany.SynchronousSchedule)
        and any(isinstance(s, lrs.ReduceLROnPlateau) for s in schedule.schedules.values())
    )
    schedule.step(metric(t)) if plateau else schedule.step()


def check_copy(build: Callable[[], tuple[Any, Any, Any]], copy_pair: Callable[[Any], Any]) -> None:
    """The copy's values equal the original's and an uncopied run's, step by step."""
    ref_optimizer, ref_schedule, ref_clock = build()
    reference = []
    for t in range(BEFORE + AFTER):
        step(ref_optimizer, ref_schedule, t, ref_clock)
        reference.append(values(ref_optimizer, ref_schedule))

    optimizer, schedule, clock = build()
    for t in range(BEFORE):
        step(optimizer, schedule, t, clock)
    before = values(optimizer, schedule)
    saved = copy.deepcopy(schedule.state_dict())
    twin_optimizer, twin_schedule, twin_clock = copy_pair((optimizer, schedule, clock))
    assert values(optimizer, schedule) == before

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step-order warning: the copy knows its optimizer
        copied = []
        for t in range(BEFORE, BEFORE + AFTER):
            step(twin_optimizer, twin_schedule, t, twin_clock)
            copied.append(values(twin_optimizer, twin_schedule))
    assert values(optimizer, schedule) == before  # the copy's steps left the original alone
    assert schedule.state_dict() == saved

    original = []
    for t in range(BEFORE, BEFORE + AFTER):
        step(optimizer, schedule, t, clock)
        original.append(values(optimizer, schedule))
    assert copied == original == reference[BEFORE:]
    assert len({str(v) for v in copied}) > 1  # the values moved, so the check can fail


def builtin_args(name: str) -> dict[str, Any]:
    args = dict(
        warmup_to_value=0.9,
        anneal_to_value=0.1,
        num_warmup_steps=4,
        num_training_steps=14,
        polynomial_exponent=1.7,
        warmup_multiplier=3.0,
        value=0.7,
        num_decay_steps=6,
        decay_shape="cosine",
    )
    return {k: args[k] for k in inspect.signature(BUILTIN_CURVES[name]).parameters}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(BUILTIN_CURVES))
def test_builtin(name: str, how: str) -> None:
    def build() -> tuple[Any, Any, Any]:
        optimizer = make_optimizer()
        target = "lr" if name == "constant_schedule" else "clip"
        built = getattr(schedany, name)(optimizer, **builtin_args(name), schedule_target=target)
        return optimizer, built, None

    check_copy(build, COPIES[how])


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("target", ["weight_decay", "betas[0]"])
@pytest.mark.parametrize("name", list(STOCK))
def test_bound_stock_scheduler(name: str, target: str, how: str) -> None:
    def build() -> tuple[Any, Any, Any]:
        optimizer = make_optimizer()
        if target == "betas[0]":
            for group in optimizer.param_groups:
                group["betas"] = (0.9, 0.999)
        bound = schedany.arbitrary_schedule_factory(optimizer, STOCK[name], None, target)
        return optimizer, bound, None

    check_copy(build, COPIES[how])


def test_every_stock_scheduler_is_covered() -> None:
    stock = {name for name in lrs.__all__ if name not in {"LRScheduler", "_LRScheduler"}}
    assert stock <= set(STOCK), f"not covered: {stock - set(STOCK)}"


def synchronous(clock: schedany.Clock | None, plateau: bool) -> schedany.SynchronousSchedule:
    optimizer = make_optimizer()
    unit = "steps" if clock is None else "tokens"
    members = [
        schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 4, 40, unit=unit),
        schedany.arbitrary_schedule_factory(
            optimizer, STOCK["ExponentialLR"], schedule_target="weight_decay", unit=unit
        ),
        schedany.arbitrary_schedule_factory(
            optimizer,
            STOCK["ReduceLROnPlateau" if plateau else "CosineAnnealingWarmRestarts"],
            schedule_target="clip",
        ),
    ]
    return schedany.SynchronousSchedule(members, clock=clock)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("variant", ["plain", "clock", "plateau", "raw lr member"])
def test_synchronous_schedule(variant: str, how: str) -> None:
    def build() -> tuple[Any, Any, Any]:
        clock = schedany.Clock() if variant == "clock" else None
        if variant != "raw lr member":
            schedule = synchronous(clock, plateau=variant == "plateau")
            return schedule.optimizer, schedule, clock
        optimizer = make_optimizer()
        schedule = schedany.SynchronousSchedule(
            [
                lrs.StepLR(optimizer, step_size=2, gamma=0.7),  # raw torch, on lr itself
                schedany.linear_schedule_with_warmup(
                    optimizer, 1.0, 0.0, 3, 15, schedule_target="weight_decay"
                ),
            ]
        )
        return optimizer, schedule, None

    check_copy(build, COPIES[how])


def test_copied_schedule_keeps_its_clock() -> None:
    """The copied schedule follows the copied clock, not the original's."""
    schedule = synchronous(schedany.Clock(), plateau=False)
    optimizer, clock = schedule.optimizer, schedule.clock
    assert clock is not None
    step(optimizer, schedule, 0, clock)  # 3 tokens
    twin_optimizer, twin = copy.deepcopy((optimizer, schedule))
    assert twin.clock is not None and twin.clock is not clock
    clock.advance(samples=1, tokens=9)
    twin.clock.advance(samples=1, tokens=2)
    optimizer.step()
    twin_optimizer.step()
    schedule.step()
    twin.step()
    assert schedule.schedules["lr"].last_epoch == 12
    assert twin.schedules["lr"].last_epoch == 5
    curve = BUILTIN_CURVES["cosine_annealing_with_warmup"](1.0, 0.1, 4, 40)
    assert math.isclose(twin_optimizer.param_groups[0]["lr"], 0.1 * curve(5))
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1 * curve(12))
