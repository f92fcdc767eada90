"""Every stock torch scheduler drives any target exactly as it drives lr."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import SGD, Adam, AdamW
from torch.optim import lr_scheduler as lrs

import schedany

BASES = [0.3, 0.05, 0.9]  # three param groups, distinct base values
STEPS = 300


def metric(t: int) -> float:
    """A loss curve with plateaus, so ReduceLROnPlateau actually reduces."""
    return 1.0 / (1 + t // 25) + 0.01 * math.sin(t)


# name -> factory(opt); every class in torch.optim.lr_scheduler
FACTORIES = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda t: 0.97**t),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda t: 0.99),
    "StepLR": lambda o: lrs.StepLR(o, step_size=30, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[20, 90, 200], gamma=0.3),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.25, total_iters=40),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=50),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.99),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=250, power=1.5),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=70, eta_min=0.001),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(
        o, T_0=20, T_mult=2, eta_min=0.0001
    ),
    "CyclicLR": lambda o: lrs.CyclicLR(
        o,
        base_lr=[0.01, 0.02, 0.03],
        max_lr=[0.5, 0.6, 0.7],
        step_size_up=13,
        mode="triangular2",
        cycle_momentum=False,
    ),
    "OneCycleLR": lambda o: lrs.OneCycleLR(
        o, max_lr=[0.5, 0.2, 0.9], total_steps=STEPS + 1, cycle_momentum=False
    ),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, 0.2, total_iters=10), lrs.ExponentialLR(o, 0.98)], milestones=[10]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, 0.5, total_iters=15), lrs.ExponentialLR(o, 0.99)]
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=3),
}

# target -> (optimizer class, its kwargs minus the target, how to put base values there)
TARGETS = {
    "weight_decay": (AdamW, {}, lambda b: {"weight_decay": b}),
    "momentum": (SGD, {"lr": 0.1}, lambda b: {"momentum": b}),
    "betas[0]": (Adam, {}, lambda b: {"betas": (b, 0.999)}),
    "custom_key": (SGD, {"lr": 0.1}, lambda b: {"custom_key": b}),
}


def test_every_scheduler_class_is_covered():
    stock = {name for name in lrs.__all__ if name not in {"LRScheduler", "_LRScheduler"}}
    assert stock <= set(FACTORIES), f"not covered: {stock - set(FACTORIES)}"


def _params():
    return [torch.nn.Parameter(torch.zeros(2)) for _ in BASES]


def _step(schedule: lrs.LRScheduler, optimizer: torch.optim.Optimizer, t: int) -> None:
    optimizer.step()
    if isinstance(schedule, lrs.ReduceLROnPlateau):
        schedule.step(metric(t))
    else:
        schedule.step()


def _reference_sequence(factory) -> list[list[float]]:
    optimizer = SGD([{"params": [p], "lr": b} for p, b in zip(_params(), BASES)])
    schedule = factory(optimizer)
    seq = [[g["lr"] for g in optimizer.param_groups]]
    for t in range(STEPS):
        _step(schedule, optimizer, t)
        seq.append([g["lr"] for g in optimizer.param_groups])
    return seq


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_bound_sequence_equals_lr_sequence(name: str, target: str):
    factory = FACTORIES[name]
    opt_cls, kwargs, place = TARGETS[target]
    groups = [{"params": [p], **place(b)} for p, b in zip(_params(), BASES)]
    default = 0.5 if target == "custom_key" else None
    if target == "custom_key":
        groups = [{"params": g["params"]} for g in groups]
    optimizer = opt_cls(groups, **kwargs)
    if target == "custom_key":  # different base values per group, like the others
        schedany.extend_optimizer(optimizer, "custom_key", 0.0)
        for group, base in zip(optimizer.param_groups, BASES):
            group["custom_key"] = base
    schedule = schedany.arbitrary_schedule_factory(optimizer, factory, default, target)
    assert type(schedule).__name__ == name  # the scheduler itself, no wrapper

    key, index = (target[:-3], 0) if target.endswith("]") else (target, None)

    def values():
        return [g[key] if index is None else g[key][index] for g in optimizer.param_groups]

    seq = [values()]
    for t in range(STEPS):
        _step(schedule, optimizer, t)
        seq.append(values())
    assert seq == _reference_sequence(factory)  # exact, every step, every group
    assert len({tuple(v) for v in seq}) > 1 or name == "ReduceLROnPlateau"


def test_user_param_groups_hold_only_user_keys():
    params = _params()
    optimizer = Adam([{"params": [p], "lr": b} for p, b in zip(params, BASES)])
    user_keys = {frozenset(g) for g in optimizer.state_dict()["param_groups"]}
    schedules = schedany.SynchronousSchedule(
        [
            schedany.arbitrary_schedule_factory(
                optimizer, FACTORIES["OneCycleLR"], schedule_target="lr"
            ),
            schedany.cosine_annealing_with_warmup(
                optimizer, 1.0, 0.1, 3, 20, schedule_target="betas[0]"
            ),
            schedany.arbitrary_schedule_factory(
                optimizer, FACTORIES["CyclicLR"], schedule_target="weight_decay"
            ),
            schedany.linear_schedule_with_warmup(
                optimizer, 1.0, 0.0, 2, 20, schedule_target="clip", default_value=1.0
            ),
        ]
    )
    for _ in range(10):
        optimizer.step()
        schedules.step()
    for group in optimizer.state_dict()["param_groups"]:
        assert frozenset(group) - {"clip"} in user_keys
        assert "clip" in group
        assert not any(k.startswith(("initial_", "max_", "min_", "base_")) for k in group)


def test_raw_scheduler_and_bound_schedule_on_lr_do_not_collide():
    """A raw StepLR writes initial_lr into the real groups; a bound schedule on an
    lr-derived key keeps its own initial_lr. Neither corrupts the other."""
    optimizer = SGD([{"params": [p], "lr": b} for p, b in zip(_params(), BASES)], momentum=0.9)
    schedany.extend_optimizer(optimizer, "lr_scale", 2.0)
    raw = lrs.StepLR(optimizer, step_size=5, gamma=0.5)
    bound = schedany.arbitrary_schedule_factory(
        optimizer, lambda o: lrs.StepLR(o, step_size=3, gamma=0.1), schedule_target="lr_scale"
    )
    expected_raw = _reference_sequence(lambda o: lrs.StepLR(o, step_size=5, gamma=0.5))
    for t in range(20):
        optimizer.step()
        raw.step()
        bound.step()
        assert [g["lr"] for g in optimizer.param_groups] == expected_raw[t + 1]
        expected_scale = [2.0 * 0.1 ** ((t + 1) // 3)] * 3
        assert [g["lr_scale"] for g in optimizer.param_groups] == pytest.approx(
            expected_scale, rel=1e-12
        )
    assert [g["initial_lr"] for g in optimizer.param_groups] == BASES  # raw's own, untouched
    assert bound.base_lrs == [2.0] * 3


def test_correct_order_emits_no_step_order_warning(recwarn):
    optimizer = AdamW([torch.nn.Parameter(torch.zeros(1))])
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 2, 10),
            schedany.cosine_annealing_with_warmup(
                optimizer, 1.0, 0.1, 2, 10, schedule_target="weight_decay"
            ),
            schedany.constant_schedule(optimizer, 0.5, schedule_target="betas[0]"),
        ]
    )
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_wrong_order_still_warns_like_torch():
    optimizer = AdamW([torch.nn.Parameter(torch.zeros(1))])
    schedule = schedany.linear_schedule_with_warmup(
        optimizer, 1.0, 0.0, 2, 10, schedule_target="weight_decay"
    )
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        schedule.step()


def test_tensor_lr_is_filled_in_place():
    optimizer = Adam([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.5))
    lr = optimizer.param_groups[0]["lr"]
    schedule = schedany.linear_schedule_with_warmup(optimizer, 1.0, 0.0, 4, 8)
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(0.5 * 1 / 4)


def test_two_chainable_schedules_on_one_key_compose_like_on_lr():
    """Two separately bound schedules on one key see each other's writes, as two torch
    schedulers on lr do (each re-reads the target after every optimizer step)."""

    def run(target: str) -> list[float]:
        optimizer = SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8, momentum=0.8)
        factories = [lambda o: lrs.StepLR(o, 3, 0.5), lambda o: lrs.ExponentialLR(o, 0.9)]
        if target == "lr":
            schedules = [f(optimizer) for f in factories]
        else:
            schedules = [
                schedany.arbitrary_schedule_factory(optimizer, f, schedule_target=target)
                for f in factories
            ]
        values = []
        for _ in range(12):
            optimizer.step()
            for schedule in schedules:
                schedule.step()
            values.append(optimizer.param_groups[0][target])
        return values

    assert run("momentum") == run("lr")


def test_bound_schedule_follows_optimizer_load_state_dict():
    """After optimizer.load_state_dict replaces the groups, a chainable bound schedule
    continues from the loaded value, exactly like a torch scheduler on lr."""

    def run(target: str) -> list[float]:
        optimizer = SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8, momentum=0.8)
        factory = lambda o: lrs.ExponentialLR(o, 0.5)  # noqa: E731
        schedule = (
            factory(optimizer)
            if target == "lr"
            else schedany.arbitrary_schedule_factory(optimizer, factory, schedule_target=target)
        )
        state = optimizer.state_dict()
        state["param_groups"][0][target] = 0.25
        optimizer.load_state_dict(state)
        values = []
        for _ in range(3):
            optimizer.step()
            schedule.step()
            values.append(optimizer.param_groups[0][target])
        return values

    assert run("momentum") == run("lr") == [0.125, 0.0625, 0.03125]


@pytest.mark.parametrize("target", ["weight_decay", "betas[0]"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_bound_sequence_in_a_synchronous_schedule_equals_lr_sequence(name: str, target: str):
    """Inside a SynchronousSchedule a member writes plain views that the coordinator
    copies to the optimizer after each step; the values are the same, every step."""
    opt_cls, kwargs, place = TARGETS[target]
    groups = [{"params": [p], **place(b)} for p, b in zip(_params(), BASES)]
    optimizer = opt_cls(groups, **kwargs)
    schedule = schedany.SynchronousSchedule(
        [
            schedany.arbitrary_schedule_factory(optimizer, FACTORIES[name], None, target),
            schedany.constant_schedule(optimizer, 0.5, schedule_target="lr"),
        ]
    )
    key, index = (target[:-3], 0) if target.endswith("]") else (target, None)

    def values():
        return [g[key] if index is None else g[key][index] for g in optimizer.param_groups]

    seq = [values()]
    for t in range(STEPS):
        optimizer.step()
        schedule.step(metric(t)) if name == "ReduceLROnPlateau" else schedule.step()
        seq.append(values())
    assert seq == _reference_sequence(FACTORIES[name])


def _two_groups_then_a_third() -> tuple[Adam, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = Adam([{"params": [params[0]]}, {"params": [params[1]]}], weight_decay=0.1)
    return optimizer, params


@pytest.mark.parametrize("after_optimizer_step", [False, True])
def test_add_param_group_fails_the_next_schedule_step(after_optimizer_step: bool):
    """The next step() of a bound scheduler raises, whether or not the optimizer stepped
    in between; the new group is never left silently unscheduled."""
    optimizer, params = _two_groups_then_a_third()
    schedule = schedany.arbitrary_schedule_factory(
        optimizer, lambda o: lrs.StepLR(o, 1, 0.5), schedule_target="weight_decay"
    )
    optimizer.step()
    schedule.step()
    optimizer.add_param_group({"params": [params[2]]})
    if after_optimizer_step:
        optimizer.step()
    with pytest.raises(
        RuntimeError,
        match=r"the optimizer had 2 param groups when 'weight_decay' was bound and has 3 "
        r"now; rebuild the schedule after add_param_group\(\)",
    ):
        schedule.step()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.05, 0.1]
