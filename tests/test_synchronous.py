"""SynchronousSchedule: lockstep stepping, metric routing, strict and exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch.optim import AdamW
from torch.optim import lr_scheduler as lrs

import schedany

NAMES = ["lr", "weight_decay", "betas[0]", "gradient_norm_threshold"]


def make_optimizer(seed: int = 0) -> AdamW:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    return AdamW(
        [
            {"params": model[0].parameters(), "lr": 0.01, "weight_decay": 0.1, "name": "decay"},
            {"params": model[1].weight, "lr": 0.02, "weight_decay": 0.2},
            {"params": model[1].bias, "lr": 0.03, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        ]
    )


def make_schedule(optimizer: AdamW) -> schedany.SynchronousSchedule:
    schedany.extend_optimizer(optimizer, "gradient_norm_threshold", 1.0)
    return schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 10, 100),
            schedany.arbitrary_schedule_factory(
                optimizer,
                lambda o: lrs.OneCycleLR(o, max_lr=0.5, total_steps=120, cycle_momentum=False),
                schedule_target="weight_decay",
            ),
            schedany.arbitrary_schedule_factory(
                optimizer,
                lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=7, eta_min=0.5),
                schedule_target="betas[0]",
            ),
            schedany.cosine_annealing_with_inverse_warmup(
                optimizer,
                1.0,
                0.2,
                15,
                90,
                warmup_multiplier=5.0,
                schedule_target="gradient_norm_threshold",
            ),
        ]
    )


def snapshot(schedule: schedany.SynchronousSchedule) -> dict[str, list[float]]:
    return {name: schedule.get_last_schedule(name) for name in schedule.schedule_names}


def optimizer_values(optimizer: AdamW) -> dict[str, list[float]]:
    return {
        "lr": [g["lr"] for g in optimizer.param_groups],
        "weight_decay": [g["weight_decay"] for g in optimizer.param_groups],
        "betas[0]": [g["betas"][0] for g in optimizer.param_groups],
        "gradient_norm_threshold": [g["gradient_norm_threshold"] for g in optimizer.param_groups],
    }


def train_step(optimizer: AdamW) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


def test_members_step_in_lockstep_and_read_back():
    optimizer = make_optimizer()
    schedule = make_schedule(optimizer)
    assert schedule.schedule_names == NAMES
    assert schedule.optimizer is optimizer
    assert set(schedule.schedules) == set(NAMES)
    for t in range(1, 30):
        train_step(optimizer)
        schedule.step()
        assert schedule.last_epoch == t
        assert all(s.last_epoch == t for s in schedule.schedules.values())
        assert snapshot(schedule) == optimizer_values(optimizer)
        assert schedule.get_last_lr() == optimizer_values(optimizer)["lr"]


def test_metric_goes_only_to_plateau_members():
    optimizer = make_optimizer()
    plateau = schedany.arbitrary_schedule_factory(
        optimizer,
        lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=0),
        schedule_target="weight_decay",
    )
    step_lr = lrs.StepLR(optimizer, step_size=2, gamma=0.5)
    schedule = schedany.SynchronousSchedule([step_lr, plateau])
    assert schedule.schedule_names == ["lr", "weight_decay"]
    for metric in [1.0, 2.0, 3.0]:  # getting worse: plateau halves weight decay every step
        train_step(optimizer)
        schedule.step(metric)
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.05, 0.0])
    assert step_lr.last_epoch == 3  # the metric never reached StepLR as an epoch
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.01, 0.015])
    with pytest.raises(TypeError, match=r"needs a metric.*\['weight_decay'\]"):
        schedule.step()


def test_a_coordinator_that_only_reads_leaves_its_members_writing():
    """Built to read a member that something else steps (the HF Trainer, Lightning), the
    coordinator must not take the member's writes over before its own first step."""
    optimizer = make_optimizer()
    bound = schedany.arbitrary_schedule_factory(
        optimizer, lambda o: lrs.StepLR(o, step_size=1, gamma=0.5), schedule_target="weight_decay"
    )
    reader = schedany.SynchronousSchedule([bound])
    start = [g["weight_decay"] for g in optimizer.param_groups]
    for _ in range(3):
        train_step(optimizer)
        bound.step()
    assert reader.get_last_schedule("weight_decay") == pytest.approx([w / 8 for w in start])
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx(
        [w / 8 for w in start]
    )


def test_duplicate_names_rejected():
    optimizer = make_optimizer()
    a = schedany.constant_schedule(optimizer, 1.0, schedule_target="weight_decay")
    b = schedany.constant_schedule(optimizer, 0.5, schedule_target="weight_decay")
    with pytest.raises(ValueError, match=r"two schedules drive 'weight_decay'"):
        schedany.SynchronousSchedule([a, b])
    raw = lrs.StepLR(optimizer, 3)
    bound_lr = schedany.constant_schedule(optimizer, 1.0)
    with pytest.raises(ValueError, match=r"two schedules drive 'lr'"):
        schedany.SynchronousSchedule([raw, bound_lr])


def test_strict_load_lists_missing_and_unknown_names():
    optimizer = make_optimizer()
    schedule = make_schedule(optimizer)
    state = schedule.state_dict()
    del state["schedules"]["betas[0]"]
    state["schedules"]["momentum"] = state["schedules"]["lr"]
    with pytest.raises(
        KeyError,
        match=r"missing from the state: \['betas\[0\]'\], unknown in the state: \['momentum'\]",
    ):
        schedule.load_state_dict(state)


def _save(optimizer: AdamW, schedule: schedany.SynchronousSchedule) -> bytes:
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "order", ["schedule_before_optimizer_load", "schedule_after_optimizer_load"]
)
def test_exact_resume_in_either_construction_order(order: str):
    optimizer = make_optimizer()
    schedule = make_schedule(optimizer)
    history = []
    for _ in range(80):
        train_step(optimizer)
        schedule.step()
        history.append(optimizer_values(optimizer))
        if len(history) == 40:
            blob = _save(optimizer, schedule)

    state = torch.load(io.BytesIO(blob), weights_only=True)
    resumed_optimizer = make_optimizer(
        seed=1
    )  # fresh, different weights: state must come from the checkpoint
    if order == "schedule_before_optimizer_load":
        resumed = make_schedule(resumed_optimizer)
        resumed_optimizer.load_state_dict(state["optimizer"])
    else:
        resumed_optimizer.load_state_dict(state["optimizer"])
        resumed = make_schedule(resumed_optimizer)
    resumed.load_state_dict(state["schedule"])

    # Right after loading, before any step(): the values saved at step 40.
    assert optimizer_values(resumed_optimizer) == history[39]
    assert snapshot(resumed) == history[39]
    assert resumed.last_epoch == 40
    for t in range(40, 80):
        train_step(resumed_optimizer)
        resumed.step()
        assert optimizer_values(resumed_optimizer) == history[t], f"step {t + 1}"
        assert snapshot(resumed) == history[t]


def test_add_param_group_fails_the_next_step_before_any_member_steps():
    """Raw torch members included: the coordinator checks first, so no member takes a
    step that the others do not."""
    optimizer = make_optimizer()
    schedule = schedany.SynchronousSchedule(
        [
            lrs.StepLR(optimizer, step_size=1, gamma=0.5),  # raw torch, on lr
            schedany.linear_schedule_with_warmup(
                optimizer, 1.0, 0.0, 2, 10, schedule_target="weight_decay"
            ),
        ]
    )
    train_step(optimizer)
    schedule.step()
    before = ([g["lr"] for g in optimizer.param_groups], snapshot(schedule))
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(
        RuntimeError,
        match=r"SynchronousSchedule: the optimizer had 3 param groups when the schedule was "
        r"built and has 4 now; rebuild the schedule after add_param_group\(\)",
    ):
        schedule.step()
    assert schedule.last_epoch == 1
    assert all(s.last_epoch == 1 for s in schedule.schedules.values())
    assert ([g["lr"] for g in optimizer.param_groups[:3]], snapshot(schedule)) == before


def test_a_failed_member_step_still_reaches_the_optimizer():
    """When one member fails (here: the clock went backwards for it), the members that
    stepped before it have written their values to the optimizer, as a bare scheduler's
    writes would have."""
    optimizer = make_optimizer()
    clock = schedany.Clock()
    schedule = schedany.SynchronousSchedule(
        [
            schedany.linear_schedule_with_warmup(optimizer, 1.0, 0.0, 4, 10),
            schedany.linear_schedule_with_warmup(
                optimizer, 1.0, 0.0, 4, 10, schedule_target="weight_decay", unit="tokens"
            ),
        ],
        clock=clock,
    )
    clock.advance(samples=1, tokens=5)
    train_step(optimizer)
    schedule.step()
    clock.load_state_dict({"steps": 2, "samples": 2, "tokens": 3})  # tokens went backwards
    train_step(optimizer)
    with pytest.raises(ValueError, match="the clock went backwards"):
        schedule.step()
    lrs_now = [g["lr"] for g in optimizer.param_groups]
    assert lrs_now == [0.01 * 2 / 4, 0.02 * 2 / 4, 0.03 * 2 / 4]
    assert schedule.get_last_lr() == lrs_now
