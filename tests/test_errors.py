"""Bad input raises a clear error naming the argument and its value, and loses nothing:
the optimizer's param_groups and defaults are deep-equal to what they were before."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim import SGD, AdamW
from torch.optim import lr_scheduler as lrs

import schedany


def make_optimizer() -> AdamW:
    """Three groups with distinct values, a tuple key, a custom float key and a
    tensor-valued custom key (schedulers fill tensors in place)."""
    params = [torch.nn.Parameter(torch.full((2,), float(i))) for i in range(3)]
    optimizer = AdamW(
        [
            {"params": [params[0]], "lr": 0.01, "weight_decay": 0.1, "name": "decay"},
            {"params": [params[1]], "lr": 0.02, "weight_decay": 0.2, "betas": (0.8, 0.99)},
            {"params": [params[2]], "lr": 0.03, "weight_decay": 0.0},
        ]
    )
    schedany.extend_optimizer(optimizer, "clip", 1.5)
    schedany.extend_optimizer(optimizer, "threshold", torch.tensor(2.0))
    for i, group in enumerate(optimizer.param_groups):
        group["threshold"] = torch.tensor(2.0 + i)
    return optimizer


def assert_deep_equal(before: Any, after: Any, path: str = "") -> None:
    assert type(before) is type(after), (
        f"{path}: {type(before).__name__} became {type(after).__name__}"
    )
    if isinstance(before, torch.Tensor):
        assert before.dtype == after.dtype and torch.equal(before, after), (
            f"{path}: {before} -> {after}"
        )
    elif isinstance(before, dict):
        # Like ==, key order is not compared (a rolled-back deletion re-adds at the end).
        assert set(before) == set(after), f"{path}: keys {sorted(before)} -> {sorted(after)}"
        for key in before:
            assert_deep_equal(before[key], after[key], f"{path}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), f"{path}: length {len(before)} -> {len(after)}"
        for i, (a, b) in enumerate(zip(before, after)):
            assert_deep_equal(a, b, f"{path}[{i}]")
    else:
        assert before == after or (before != before and after != after), (
            f"{path}: {before!r} -> {after!r}"
        )


@contextmanager
def untouched(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The body may raise (inside pytest.raises); the optimizer must not change."""
    groups, defaults = copy.deepcopy(optimizer.param_groups), copy.deepcopy(optimizer.defaults)
    params = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    yield
    assert_deep_equal(groups, optimizer.param_groups, "param_groups")
    assert_deep_equal(defaults, optimizer.defaults, "defaults")
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == params


def bind(
    target: str,
    default_value: Any = None,
    factory: Callable[[Any], Any] = lambda o: lrs.StepLR(o, step_size=3),
) -> Callable[[AdamW], Any]:
    return lambda opt: schedany.arbitrary_schedule_factory(opt, factory, default_value, target)


def builtin(name: str, *args: Any, **kwargs: Any) -> Callable[[AdamW], Any]:
    return lambda opt: getattr(schedany, name)(opt, *args, **kwargs)


COSINE = "cosine_annealing_with_warmup"
WSD = "warmup_stable_decay"
# id -> (call on the optimizer, exception, message that names the argument and its value)
CASES: dict[str, tuple[Callable[[AdamW], Any], type[Exception], str]] = {
    # --- targets
    "unknown target, did you mean": (
        bind("weight_decy"),
        KeyError,
        r"schedule_target='weight_decy': param_groups\[0\] has no key 'weight_decy'.*did you mean "
        r"'weight_decay'\?",
    ),
    "unknown target on a built-in": (
        builtin(COSINE, 1.0, 0.1, 2, 10, schedule_target="cilp"),
        KeyError,
        r"schedule_target='cilp'.*did you mean 'clip'\?",
    ),
    "non-numeric target params": (
        bind("params"),
        TypeError,
        r"schedule_target='params': param_groups\[0\] holds a non-numeric list",
    ),
    "non-numeric target name": (
        bind("name"),
        TypeError,
        r"schedule_target='name': param_groups\[0\] holds a non-numeric str there \('decay'\)",
    ),
    "whole tuple target": (
        bind("betas"),
        TypeError,
        r"schedule_target='betas': param_groups\[0\] holds a non-numeric tuple",
    ),
    "tuple index out of range": (
        bind("betas[5]"),
        ValueError,
        r"schedule_target='betas\[5\]': index 5 is out of range for "
        r"param_groups\[0\]\['betas'\]=\(0\.9, 0\.999\) of length 2",
    ),
    "malformed element target": (
        bind("betas[x"),
        ValueError,
        r"schedule_target='betas\[x': is malformed",
    ),
    "negative element index": (
        bind("betas[-1]"),
        ValueError,
        r"schedule_target='betas\[-1\]': is malformed",
    ),
    "element of a scalar key": (
        bind("weight_decay[0]"),
        TypeError,
        r"schedule_target='weight_decay\[0\]': param_groups\[0\]\['weight_decay'\] is float 0\.1, "
        r"not a tuple or list",
    ),
    "target not a string": (
        bind(0),
        TypeError,
        r"schedule_target=0: expected a non-empty string such as 'weight_decay'",
    ),  # type: ignore[arg-type]
    "empty target": (
        bind(""),
        TypeError,
        r"schedule_target='': expected a non-empty string such as 'weight_decay'",
    ),
    "default_value on an element target": (
        bind("gammas[0]", default_value=0.5),
        ValueError,
        r"schedule_target='gammas\[0\]': default_value=0\.5 cannot create an element target",
    ),
    "non-numeric default_value is rolled back": (
        bind("fresh_key", default_value="high"),
        TypeError,
        r"schedule_target='fresh_key': param_groups\[0\] holds a non-numeric str there \('high'\)",
    ),
    # --- the factory
    "factory not callable": (
        lambda opt: schedany.arbitrary_schedule_factory(opt, 3, schedule_target="clip"),
        TypeError,  # type: ignore[arg-type]
        r"schedule_factory must be callable \(proxy -> scheduler\), got 3",
    ),
    "factory returns a non-scheduler": (
        bind("clip", factory=lambda o: 42),
        TypeError,
        r"schedule_factory must return a torch\.optim\.lr_scheduler\.LRScheduler, got int: 42",
    ),
    "OneCycleLR momentum cycling on a bound target": (
        bind("weight_decay", factory=lambda o: lrs.OneCycleLR(o, max_lr=0.5, total_steps=10)),
        ValueError,
        r"schedule_target='weight_decay': momentum cycling \(cycle_momentum=True",
    ),
    # CyclicLR writes its base_lr into the target before it checks cycle_momentum.
    "CyclicLR momentum cycling writes, then is rolled back": (
        bind("threshold", factory=lambda o: lrs.CyclicLR(o, base_lr=0.001, max_lr=0.1)),
        ValueError,
        r"schedule_target='threshold': momentum cycling \(cycle_momentum=True",
    ),
    "not an optimizer": (
        lambda opt: schedany.arbitrary_schedule_factory(
            torch.nn.Linear(1, 1), lambda o: lrs.StepLR(o, 3)
        ),
        TypeError,
        r"optimizer must be a torch\.optim\.Optimizer, got Linear",
    ),
    # --- built-in arguments (W, A, L, M, P, R)
    "negative warmup steps": (
        builtin(COSINE, 1.0, 0.1, -1, 100),
        ValueError,
        r"cosine_annealing_with_warmup requires num_warmup_steps to be an integer >= 0, got "
        r"num_warmup_steps=-1",
    ),
    "negative training steps": (
        builtin("linear_schedule_with_warmup", 1.0, 0.1, 0, -5),
        ValueError,
        r"linear_schedule_with_warmup requires num_training_steps to be an integer >= 0, got "
        r"num_training_steps=-5",
    ),
    "inverted step counts": (
        builtin("quadratic_schedule_with_inverse_warmup", 1.0, 0.1, 50, 20),
        ValueError,
        r"quadratic_schedule_with_inverse_warmup requires num_training_steps to be an integer "
        r">= num_warmup_steps \(50\), got num_training_steps=20",
    ),
    "no training steps while annealing": (
        builtin("sqrt_schedule_with_warmup", 1.0, 0.1, 0, 0),
        ValueError,
        r"sqrt_schedule_with_warmup requires num_training_steps to be an integer > 0 when "
        r"annealing, got num_training_steps=0",
    ),
    "negative warmup steps, constant": (
        builtin("constant_with_warmup", 1.0, -3),
        ValueError,
        r"constant_with_warmup requires num_warmup_steps to be an integer >= 0, got "
        r"num_warmup_steps=-3",
    ),
    "float step count": (
        builtin(COSINE, 1.0, 0.1, 10.0, 100),
        TypeError,
        r"cosine_annealing_with_warmup requires num_warmup_steps to be an integer >= 0, got "
        r"num_warmup_steps=10\.0",
    ),
    "bool step count": (
        builtin(COSINE, 1.0, 0.1, 10, True),
        TypeError,
        r"requires num_training_steps to be an integer >= 0, got num_training_steps=True",
    ),
    "NaN warmup_to_value": (
        builtin(COSINE, math.nan, 0.1, 10, 100),
        ValueError,
        r"cosine_annealing_with_warmup requires warmup_to_value to be a finite number, got "
        r"warmup_to_value=nan",
    ),
    "infinite anneal_to_value": (
        builtin("polynomial_schedule_with_warmup", 1.0, math.inf, 10, 100),
        ValueError,
        r"requires anneal_to_value to be a finite number, got anneal_to_value=inf",
    ),
    "infinite warmup_multiplier": (
        builtin(
            "cosine_annealing_with_inverse_warmup", 1.0, 0.1, 10, 100, warmup_multiplier=math.inf
        ),
        ValueError,
        r"requires warmup_multiplier to be a finite number >= 1, got warmup_multiplier=inf",
    ),
    "NaN polynomial_exponent": (
        builtin(
            "polynomial_schedule_with_inverse_warmup",
            1.0,
            0.1,
            10,
            100,
            polynomial_exponent=math.nan,
        ),
        ValueError,
        r"requires polynomial_exponent to be a finite number > 0, got polynomial_exponent=nan",
    ),
    "infinite constant value": (
        builtin("constant_schedule", -math.inf),
        ValueError,
        r"constant_schedule requires value to be a finite number, got value=-inf",
    ),
    "string value": (
        builtin("constant_with_inverse_warmup", "0.5", 10),
        TypeError,
        r"constant_with_inverse_warmup requires warmup_to_value to be a finite number, got "
        r"warmup_to_value='0\.5'",
    ),
    "warmup_multiplier < 1": (
        builtin("linear_schedule_with_inverse_warmup", 1.0, 0.1, 10, 100, warmup_multiplier=0.5),
        ValueError,
        r"linear_schedule_with_inverse_warmup requires warmup_multiplier to be a finite number >= "
        r"1, got warmup_multiplier=0\.5",
    ),
    "warmup_multiplier < 1, constant": (
        builtin("constant_with_inverse_warmup", 1.0, 10, warmup_multiplier=0.0),
        ValueError,
        r"requires warmup_multiplier to be a finite number >= 1, got warmup_multiplier=0\.0",
    ),
    "zero polynomial_exponent": (
        builtin("polynomial_schedule_with_warmup", 1.0, 0.1, 10, 100, polynomial_exponent=0),
        ValueError,
        r"polynomial_schedule_with_warmup requires polynomial_exponent to be a finite number > 0, "
        r"got polynomial_exponent=0",
    ),
    "negative polynomial_exponent": (
        builtin("polynomial_schedule_with_warmup", 1.0, 0.1, 10, 100, polynomial_exponent=-1.5),
        ValueError,
        r"requires polynomial_exponent to be a finite number > 0, got polynomial_exponent=-1\.5",
    ),
    # --- warmup_stable_decay's own arguments (D, the shape), and the shared ones
    "negative decay steps": (
        builtin(WSD, 1.0, 0.1, 10, 100, -1),
        ValueError,
        r"warmup_stable_decay requires num_decay_steps to be an integer >= 0, got "
        r"num_decay_steps=-1",
    ),
    "decay longer than the steps after warmup": (
        builtin(WSD, 1.0, 0.1, 10, 100, 91),
        ValueError,
        r"warmup_stable_decay requires num_decay_steps to be an integer <= num_training_steps - "
        r"num_warmup_steps \(90\), got num_decay_steps=91",
    ),
    "float decay steps": (
        builtin(WSD, 1.0, 0.1, 10, 100, 40.0),
        TypeError,
        r"warmup_stable_decay requires num_decay_steps to be an integer >= 0, got "
        r"num_decay_steps=40\.0",
    ),
    "unknown decay shape": (
        builtin(WSD, 1.0, 0.1, 10, 100, 40, decay_shape="exponential"),
        ValueError,
        r"warmup_stable_decay requires decay_shape to be 'linear', 'cosine' or 'sqrt', got "
        r"decay_shape='exponential'",
    ),
    "inverted step counts, WSD": (
        builtin(WSD, 1.0, 0.1, 50, 20, 0),
        ValueError,
        r"warmup_stable_decay requires num_training_steps to be an integer >= num_warmup_steps "
        r"\(50\), got num_training_steps=20",
    ),
    "zero training steps, WSD": (
        builtin(WSD, 1.0, 0.1, 0, 0, 0),
        ValueError,
        r"warmup_stable_decay requires num_training_steps to be an integer > 0 when annealing, "
        r"got num_training_steps=0",
    ),
    "negative warmup steps, WSD": (
        builtin(WSD, 1.0, 0.1, -2, 100, 10),
        ValueError,
        r"warmup_stable_decay requires num_warmup_steps to be an integer >= 0, got "
        r"num_warmup_steps=-2",
    ),
    "NaN anneal_to_value, WSD": (
        builtin(WSD, 1.0, math.nan, 10, 100, 10, schedule_target="weight_decay"),
        ValueError,
        r"warmup_stable_decay requires anneal_to_value to be a finite number, got "
        r"anneal_to_value=nan",
    ),
    # --- optimizer utilities
    "extend with an element name": (
        lambda opt: schedany.extend_optimizer(opt, "betas[0]", 0.5),
        ValueError,
        r"extend_optimizer: name must be a plain key .*got 'betas\[0\]'",
    ),
    "extend params": (
        lambda opt: schedany.extend_optimizer(opt, "params", 0.5),
        ValueError,
        r"extend_optimizer: name='params'",
    ),
    "extend with a string default": (
        lambda opt: schedany.extend_optimizer(opt, "k", "abc"),
        TypeError,
        r"extend_optimizer requires default_value to be a real number or a non-empty "
        r"tuple/list of real numbers \(the value of key 'k'\), got default_value='abc'",
    ),
    "extend with a tuple holding a string": (
        lambda opt: schedany.extend_optimizer(opt, "gammas", (0.9, "x"), overwrite_values=True),
        TypeError,
        r"extend_optimizer requires default_value .* got default_value=\(0\.9, 'x'\)",
    ),
    "extend an existing key with a bad default": (
        lambda opt: schedany.extend_optimizer(opt, "clip", None, overwrite_values=True),
        TypeError,
        r"\(the value of key 'clip'\), got default_value=None",
    ),
    "regroup by an unknown key": (
        lambda opt: schedany.get_param_groups_regrouped_by_key(opt, "weightdecay"),
        KeyError,
        r"schedule_target='weightdecay': no param group holds 'weightdecay'.*did you mean "
        r"'weight_decay'\?",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_and_leaves_optimizer_untouched(case: str):
    call, error, match = CASES[case]
    optimizer = make_optimizer()
    with untouched(optimizer), pytest.raises(error, match=match):
        call(optimizer)


def test_factory_that_raises_after_writing_is_rolled_back():
    optimizer = make_optimizer()
    threshold = optimizer.param_groups[1]["threshold"]

    def factory(proxy: Any) -> lrs.LRScheduler:
        proxy.param_groups[0]["lr"] = 123.0  # the target, through the proxy
        real = proxy.optimizer
        real.param_groups[1]["threshold"].fill_(-7.0)  # a tensor, in place
        real.param_groups[1]["weight_decay"] = 9.0
        real.param_groups[2]["betas"] = [0.1, 0.2]
        real.param_groups[2]["stray"] = 1
        real.defaults["stray"] = 1
        del real.param_groups[0]["name"]
        raise ValueError("factory failed: step_size=0")

    with untouched(optimizer), pytest.raises(ValueError, match=r"factory failed: step_size=0"):
        schedany.arbitrary_schedule_factory(optimizer, factory, schedule_target="clip")
    assert optimizer.param_groups[1]["threshold"] is threshold  # same tensor, old value


def test_factory_built_on_the_real_optimizer_is_rolled_back():
    """StepLR on the real optimizer writes initial_lr into the user's groups."""
    optimizer = make_optimizer()
    with (
        untouched(optimizer),
        pytest.raises(
            ValueError, match=r"schedule_factory built its StepLR on AdamW, not on the proxy"
        ),
    ):
        schedany.arbitrary_schedule_factory(
            optimizer, lambda proxy: lrs.StepLR(optimizer, step_size=3), schedule_target="clip"
        )


def test_factory_given_the_proxy_as_optimizer():
    optimizer = make_optimizer()
    bound = schedany.arbitrary_schedule_factory(
        optimizer, lambda o: lrs.StepLR(o, 3), schedule_target="clip"
    )
    with untouched(optimizer), pytest.raises(TypeError, match=r"optimizer is a schedany proxy"):
        schedany.arbitrary_schedule_factory(bound.optimizer, lambda o: lrs.StepLR(o, 3))


# --- the coordinator ------------------------------------------------------------------


def members(optimizer: AdamW) -> list[lrs.LRScheduler]:
    return [
        schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 2, 10),
        schedany.linear_schedule_with_warmup(
            optimizer, 1.0, 0.0, 2, 10, schedule_target="weight_decay"
        ),
        schedany.constant_schedule(optimizer, 0.5, schedule_target="betas[0]"),
    ]


def step_all(optimizer: AdamW, schedule: schedany.SynchronousSchedule, n: int = 3) -> None:
    for _ in range(n):
        optimizer.step()
        schedule.step()


def test_empty_schedule_list():
    with pytest.raises(ValueError, match=r"needs at least one schedule, got an empty list"):
        schedany.SynchronousSchedule([])


def test_single_scheduler_instead_of_a_list():
    optimizer = make_optimizer()
    schedule = members(optimizer)[0]
    with (
        untouched(optimizer),
        pytest.raises(TypeError, match=r"takes a list of schedulers, got LambdaLR"),
    ):
        schedany.SynchronousSchedule(schedule)  # type: ignore[arg-type]


def test_member_that_is_not_a_scheduler():
    optimizer = make_optimizer()
    schedules = members(optimizer)
    with (
        untouched(optimizer),
        pytest.raises(TypeError, match=r"schedules\[3\] must be a torch LRScheduler .*got str"),
    ):
        schedany.SynchronousSchedule([*schedules, "lr"])  # type: ignore[list-item]


def test_schedules_on_two_optimizers():
    first, second = make_optimizer(), make_optimizer()
    a = schedany.constant_schedule(first, 0.5, schedule_target="clip")
    b = schedany.constant_schedule(second, 0.5, schedule_target="weight_decay")
    with (
        untouched(first),
        untouched(second),
        pytest.raises(
            ValueError,
            match=r"schedules\[1\] \(LambdaLR\) drives a different optimizer than schedules\[0\]",
        ),
    ):
        schedany.SynchronousSchedule([a, b])


def test_duplicate_names():
    optimizer = make_optimizer()
    schedules = members(optimizer)
    extra = schedany.constant_schedule(optimizer, 0.5, schedule_target="weight_decay")
    with (
        untouched(optimizer),
        pytest.raises(
            ValueError,
            match=r"two schedules drive 'weight_decay' \(schedules\[1\] and schedules\[3\]\)",
        ),
    ):
        schedany.SynchronousSchedule([*schedules, extra])


def test_raw_scheduler_and_bound_lr_share_the_name_lr():
    optimizer = make_optimizer()
    bound = schedany.constant_schedule(optimizer, 0.5)
    raw = lrs.StepLR(optimizer, step_size=3)
    with (
        untouched(optimizer),
        pytest.raises(
            ValueError, match=r"two schedules drive 'lr' \(schedules\[0\] and schedules\[1\]\)"
        ),
    ):
        schedany.SynchronousSchedule([bound, raw])


def test_get_last_schedule_of_an_unknown_name():
    optimizer = make_optimizer()
    schedule = schedany.SynchronousSchedule(members(optimizer))
    with (
        untouched(optimizer),
        pytest.raises(
            KeyError,
            match=(
                r"no schedule named 'weight_decy'; this schedule has \['lr', 'weight_decay', "
                r"'betas\[0\]'\]"
            ),
        ),
    ):
        schedule.get_last_schedule("weight_decy")


def _saved_and_fresh() -> tuple[dict[str, Any], AdamW, schedany.SynchronousSchedule]:
    optimizer = make_optimizer()
    schedule = schedany.SynchronousSchedule(members(optimizer))
    step_all(optimizer, schedule, 5)
    saved = copy.deepcopy(schedule.state_dict())
    fresh_optimizer = make_optimizer()
    fresh = schedany.SynchronousSchedule(members(fresh_optimizer))
    step_all(fresh_optimizer, fresh, 1)
    return saved, fresh_optimizer, fresh


@contextmanager
def schedule_untouched(schedule: schedany.SynchronousSchedule) -> Iterator[None]:
    before = copy.deepcopy(schedule.state_dict())
    yield
    assert_deep_equal(before, schedule.state_dict(), "state_dict")


def test_strict_load_with_a_missing_name():
    saved, optimizer, schedule = _saved_and_fresh()
    del saved["schedules"]["betas[0]"]
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(
            KeyError, match=r"missing from the state: \['betas\[0\]'\], unknown in the state: \[\]"
        ),
    ):
        schedule.load_state_dict(saved)


def test_strict_load_with_an_unknown_name():
    saved, optimizer, schedule = _saved_and_fresh()
    saved["schedules"]["momentum"] = saved["schedules"]["lr"]
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(
            KeyError, match=r"missing from the state: \[\], unknown in the state: \['momentum'\]"
        ),
    ):
        schedule.load_state_dict(saved)


def test_load_without_schedules_entry():
    saved, optimizer, schedule = _saved_and_fresh()
    del saved["schedules"]
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(
            KeyError, match=r"state_dict has no 'schedules' entry \(got \['last_epoch'\]\)"
        ),
    ):
        schedule.load_state_dict(saved)


def test_load_state_saved_with_another_group_count():
    saved, optimizer, schedule = _saved_and_fresh()
    for member in saved["schedules"].values():
        member["values"] = member["values"][:2]
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(
            ValueError, match=r"schedule 'lr' was saved with 2 param groups, the optimizer has 3"
        ),
    ):
        schedule.load_state_dict(saved)


def test_load_with_a_corrupt_member_after_a_good_one():
    """A member that fails to load must not leave earlier members half-loaded."""
    saved, optimizer, schedule = _saved_and_fresh()
    saved["schedules"]["betas[0]"]["bookkeeping"] = saved["schedules"]["betas[0]"]["bookkeeping"][
        :1
    ]
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(
            ValueError,
            match=r"schedule 'betas\[0\]' was saved with 1 param groups, the optimizer has 3",
        ),
    ):
        schedule.load_state_dict(saved)


def test_load_after_a_member_changed_class():
    """Saved with StepLR on weight_decay, loaded into a LambdaLR there: torch fails inside
    the second member, after 'lr' was loaded; 'lr' and the optimizer are rolled back."""
    saved, optimizer, schedule = _saved_and_fresh()
    other_optimizer = make_optimizer()
    other = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(other_optimizer, 1.0, 0.1, 2, 10),
            schedany.arbitrary_schedule_factory(
                other_optimizer,
                lambda o: lrs.StepLR(o, step_size=2),
                schedule_target="weight_decay",
            ),
            schedany.constant_schedule(other_optimizer, 0.5, schedule_target="betas[0]"),
        ]
    )
    step_all(other_optimizer, other, 4)
    saved = copy.deepcopy(other.state_dict())
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(KeyError, match=r"lr_lambdas"),
    ):
        schedule.load_state_dict(saved)
    step_all(optimizer, schedule, 1)  # still usable
    assert schedule.last_epoch == 2


def test_plateau_member_without_a_metric():
    optimizer = make_optimizer()
    schedule = schedany.SynchronousSchedule(
        [
            *members(optimizer)[:1],
            schedany.arbitrary_schedule_factory(
                optimizer,
                lambda o: lrs.ReduceLROnPlateau(o, patience=0),
                schedule_target="weight_decay",
            ),
        ]
    )
    optimizer.step()
    schedule.step(0.5)
    with (
        untouched(optimizer),
        schedule_untouched(schedule),
        pytest.raises(
            TypeError,
            match=r"needs a metric for its ReduceLROnPlateau schedule\(s\) \['weight_decay'\]",
        ),
    ):
        schedule.step()


def test_sgd_without_betas_names_the_available_keys():
    optimizer = SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    with (
        untouched(optimizer),
        pytest.raises(
            KeyError,
            match=(
                r"schedule_target='betas\[0\]': param_groups\[0\] has no key 'betas' \(it has "
                r"\[.*'momentum'.*\]\)"
            ),
        ),
    ):
        schedany.constant_schedule(optimizer, 0.5, schedule_target="betas[0]")


@pytest.mark.parametrize(
    "value", [2, 0.5, np.float32(0.25), torch.tensor(0.3), (0.9, 0.99), [1, 2.5], math.inf]
)
def test_extend_accepts_real_numbers_and_tuples_of_them(value: Any):
    optimizer = make_optimizer()
    schedany.extend_optimizer(optimizer, "fresh", value)
    assert all(g["fresh"] is value for g in optimizer.param_groups)
    assert optimizer.defaults["fresh"] is value


@pytest.mark.parametrize("value", [True, [], (0.5, None), {"a": 1}, torch.zeros(2), "0.5"])
def test_extend_rejects_other_defaults(value: Any):
    optimizer = make_optimizer()
    with untouched(optimizer), pytest.raises(TypeError, match=r"got default_value="):
        schedany.extend_optimizer(optimizer, "fresh", value)
