"""Single-process behaviour of the reactive controllers.

Invariant: a controller takes the decisions, and leaves the ``.grad``, that the paper's
hand-written loop (sections 5.2 and 5.3) or a one-shot computation of the whole logical
batch would.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import schedany
from schedany.control import GradientNormThreshold, LogicalBatchSize
from schedany.control._grad_sync import GradientSync

F64 = torch.float64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)


def make_batch(j: int, n: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(17 + j)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = x.sum(1, keepdim=True).sin() + noise * torch.randn(n, 1, generator=g, dtype=F64)
    return x, y


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def assert_close_lists(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def sgd_with(model: nn.Module, key: str, value: float) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    opt.param_groups[0][key] = value
    return opt


# --- 1. the paper's loops, by hand --------------------------------------------------

BATCH_SIZE = 4


def paper_logical_batch_schedule(optimizer: torch.optim.Optimizer) -> schedany.SynchronousSchedule:
    """Section 5.2's make_schedule: warm lr up, grow the logical batch quadratically."""
    schedany.extend_optimizer(optimizer, "logical_batch_size_target", 16.0)
    lr_schedule = schedany.warmup_to_constant(optimizer, 1.0, 2)
    batch_schedule = schedany.quadratic_schedule_with_warmup(
        optimizer, 1.0, 3.0, 2, 8, schedule_target="logical_batch_size_target"
    )
    return schedany.SynchronousSchedule([lr_schedule, batch_schedule])


def get_accum_threshold(optimizer: torch.optim.Optimizer) -> float:
    batch_threshold = max(group["logical_batch_size_target"] for group in optimizer.param_groups)
    return batch_threshold / BATCH_SIZE


def test_logical_batch_size_takes_the_paper_loops_decisions_and_grads() -> None:
    data = [make_batch(j, BATCH_SIZE) for j in range(60)]

    # The paper's loop (section 5.2), with two changes, each marked: the threshold is read
    # when a logical batch starts, after schedule.step() (the paper starts from 1 and
    # re-reads it before schedule.step(), one step stale), and the loss is divided by
    # ceil() rather than int() of it, i.e. by the micro-steps actually accumulated.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    schedule = paper_logical_batch_schedule(optimizer)
    paper_decisions, paper_grads = [], []
    accum_steps = 0
    accum_threshold = get_accum_threshold(optimizer)  # changed: not 1
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        (loss / max(math.ceil(accum_threshold), 1)).backward()  # changed: ceil, not int
        accum_steps += 1
        paper_decisions.append(accum_steps >= accum_threshold)
        if accum_steps >= accum_threshold:
            paper_grads.append(grads_of(model))
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()  # changed: before the threshold is re-read
            accum_threshold = get_accum_threshold(optimizer)
            accum_steps = 0
    paper_params = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    schedule = paper_logical_batch_schedule(optimizer)
    ctl = LogicalBatchSize(
        model, optimizer, "logical_batch_size_target", micro_batch_size=BATCH_SIZE
    )
    decisions, grads = [], []
    for x, y in data:
        with ctl.accumulate():
            nn.functional.mse_loss(model(x), y).backward()
        decisions.append(ctl.ready)
        if ctl.ready:
            grads.append(grads_of(model))
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()

    assert decisions == paper_decisions
    assert 6 <= sum(decisions) < len(decisions) / 2  # several steps, several accumulating
    assert len(grads) == len(paper_grads)
    for ours, theirs in zip(grads, paper_grads):
        assert_close_lists(ours, theirs)
    assert_close_lists([p.detach() for p in model.parameters()], paper_params)


def paper_gnts_schedule(optimizer: torch.optim.Optimizer) -> schedany.SynchronousSchedule:
    """Section 5.3's make_schedule."""
    schedany.extend_optimizer(optimizer, "gradient_norm_threshold", 1.5)
    lr_schedule = schedany.constant_with_warmup(optimizer, 1.0, 2)
    wd_schedule = schedany.cosine_annealing_with_warmup(
        optimizer, 1.0, 0.1, 2, 12, schedule_target="weight_decay"
    )
    threshold_schedule = schedany.cosine_annealing_with_inverse_warmup(
        optimizer, 1.0, 0.3, 2, 12, schedule_target="gradient_norm_threshold"
    )
    return schedany.SynchronousSchedule([lr_schedule, wd_schedule, threshold_schedule])


def get_grad_norm_target(optimizer: torch.optim.Optimizer) -> float:
    return max(group["gradient_norm_threshold"] for group in optimizer.param_groups)


def get_grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


def test_gradient_norm_threshold_takes_the_paper_loops_decisions_and_grads() -> None:
    data = [make_batch(j, BATCH_SIZE) for j in range(80)]

    # The paper's loop (section 5.3), verbatim, inside the usual step/zero_grad/schedule lines.
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    schedule = paper_gnts_schedule(optimizer)
    paper_decisions, paper_grads = [], []
    accum_steps = 0
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        accum_steps += 1
        mean_grad_norm = get_grad_norm(model) / accum_steps
        paper_decisions.append(bool(mean_grad_norm <= get_grad_norm_target(optimizer)))
        if mean_grad_norm <= get_grad_norm_target(optimizer):
            for param in model.parameters():
                if param is not None:
                    param.grad /= accum_steps
            accum_steps = 0
            paper_grads.append(grads_of(model))
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    paper_params = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    schedule = paper_gnts_schedule(optimizer)
    ctl = GradientNormThreshold(model, optimizer)
    decisions, grads = [], []
    for x, y in data:
        with ctl.accumulate():
            nn.functional.mse_loss(model(x), y).backward()
        decisions.append(ctl.ready)
        if ctl.ready:
            grads.append(grads_of(model))
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()

    assert decisions == paper_decisions
    assert 5 <= sum(decisions) < len(decisions) * 0.7  # steps, and real accumulation
    for ours, theirs in zip(grads, paper_grads):
        assert_close_lists(ours, theirs)
    assert_close_lists([p.detach() for p in model.parameters()], paper_params)


# --- exact per-item means with num_items ---------------------------------------------

SIZES = [5, 1, 3, 7, 2, 1, 6, 4, 2, 3, 1, 8, 2, 5, 3]


def whole_batch_mean_grad(params_model: nn.Module, batches: list) -> list[torch.Tensor]:
    """One process computing the logical batch at once: grad of the per-item mean loss."""
    model = make_model()
    model.load_state_dict(params_model.state_dict())
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    (model(x) - y).pow(2).mean().backward()
    return grads_of(model)


def test_logical_batch_size_with_num_items_leaves_the_whole_batch_mean() -> None:
    targets = iter([7.5, 12, 4, 20, 9, 30])  # not multiples of anything
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", next(targets))
    ctl = LogicalBatchSize(model, opt)
    pending, closed = [], 0
    for j, n in enumerate(SIZES * 3):
        batch = make_batch(j, n)
        pending.append(batch)
        before = make_model()
        before.load_state_dict(model.state_dict())
        with ctl.accumulate(num_items=n):
            (model(batch[0]) - batch[1]).pow(2).sum().backward()
        items = sum(len(b[0]) for b in pending)
        assert ctl.ready == (items >= ctl.metrics()["target"])
        assert ctl.metrics()["items"] == items
        if ctl.ready:
            assert_close_lists(grads_of(model), whole_batch_mean_grad(before, pending))
            opt.step()
            opt.zero_grad()
            pending, closed = [], closed + 1
            if closed == 6:
                break
            opt.param_groups[0]["logical_batch_size"] = next(targets)
    assert closed == 6


def test_gradient_norm_threshold_with_num_items_judges_the_per_item_mean() -> None:
    model = make_model()
    opt = sgd_with(model, "gradient_norm_threshold", 0.9)
    ctl = GradientNormThreshold(model, opt, max_accumulation_steps=5)
    pending, decisions, reference = [], [], []
    for j, n in enumerate(SIZES * 2):
        batch = make_batch(j, n, noise=2.0)
        pending.append(batch)
        before = make_model()
        before.load_state_dict(model.state_dict())
        with ctl.accumulate(num_items=n):
            (model(batch[0]) - batch[1]).pow(2).sum().backward()
        mean = whole_batch_mean_grad(before, pending)
        norm = torch.nn.utils.get_total_norm(mean).item()
        assert ctl.metrics()["grad_norm"] == pytest.approx(norm, rel=1e-12)
        reference.append(norm <= 0.9 or len(pending) == 5)
        decisions.append(ctl.ready)
        if ctl.ready:
            assert_close_lists(grads_of(model), mean)
            opt.step()
            opt.zero_grad()
            pending = []
    assert decisions == reference
    assert 3 <= sum(decisions) < len(decisions) - 3


def test_max_accumulation_steps_forces_the_step() -> None:
    model = make_model()
    opt = sgd_with(model, "gradient_norm_threshold", 0.0)  # never satisfied
    ctl = GradientNormThreshold(model, opt, max_accumulation_steps=3)
    seen = []
    for j in range(9):
        x, y = make_batch(j, 4)
        with ctl.accumulate():
            nn.functional.mse_loss(model(x), y).backward()
        seen.append(ctl.ready)
        if ctl.ready:
            opt.step()
            opt.zero_grad()
    assert seen == [False, False, True] * 3
    assert ctl.metrics()["optimizer_steps"] == 3


def test_target_is_read_when_the_logical_batch_starts() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 12)
    ctl = LogicalBatchSize(model, opt, micro_batch_size=4)
    ready = []
    for j in range(5):
        x, y = make_batch(j, 4)
        with ctl.accumulate():
            nn.functional.mse_loss(model(x), y).backward()
        opt.param_groups[0]["logical_batch_size"] = 4  # mid-batch change: next batch only
        ready.append(ctl.ready)
        if ctl.ready:
            opt.zero_grad()
    assert ready == [False, False, True, True, True]


def test_max_over_param_groups_is_the_target() -> None:
    a, b = nn.Linear(2, 1).to(F64), nn.Linear(2, 1).to(F64)
    opt = torch.optim.SGD(
        [
            {"params": a.parameters(), "logical_batch_size": 4},
            {"params": b.parameters(), "logical_batch_size": 8},
        ],
        lr=0.1,
    )
    model = nn.ModuleList([a, b])
    ctl = LogicalBatchSize(model, opt, micro_batch_size=4)
    with ctl.accumulate():
        (a(torch.ones(4, 2, dtype=F64)) + b(torch.ones(4, 2, dtype=F64))).mean().backward()
    assert not ctl.ready and ctl.metrics()["target"] == 8


def test_grad_norm_spans_parameters_of_mixed_dtypes() -> None:
    """Norms are taken per (device, dtype) group; the groups still add up to one norm."""
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(3, 2).to(F64), nn.Linear(3, 5), nn.Linear(5, 1).to(F64)])
    opt = sgd_with(model, "gradient_norm_threshold", 0.0)
    ctl = GradientNormThreshold(model, opt)
    x = torch.randn(4, 3, dtype=F64)
    with ctl.accumulate():
        (model[0](x).sum() + model[2](model[1](x.float()).double()).sum()).backward()
    want = torch.linalg.vector_norm(
        torch.stack([p.grad.double().norm() for p in model.parameters()])
    )
    assert ctl.metrics()["grad_norm"] == pytest.approx(want.item(), rel=1e-6)


# --- non-finite gradients --------------------------------------------------------------


@pytest.mark.parametrize("controller", ["logical_batch", "gnts"])
def test_nonfinite_gradients_drop_the_logical_batch(controller: str) -> None:
    model = make_model()
    if controller == "logical_batch":  # closes (and can only judge) after 2 micro-steps
        opt = sgd_with(model, "logical_batch_size", 8)
        ctl = LogicalBatchSize(model, opt, micro_batch_size=4)
        bad_batch_micro_steps = 2
    else:  # judges every micro-step, so drops at once
        opt = sgd_with(model, "gradient_norm_threshold", 0.0)
        ctl = GradientNormThreshold(model, opt, max_accumulation_steps=2)
        bad_batch_micro_steps = 1
    start = [p.detach().clone() for p in model.parameters()]
    for j in range(bad_batch_micro_steps):
        x, y = make_batch(j, 4)
        if j == 0:
            x[1, 2] = float("nan")
        with ctl.accumulate():
            nn.functional.mse_loss(model(x), y).backward()
        assert not ctl.ready  # so the caller never steps
    metrics = ctl.metrics()
    assert metrics["dropped_batches"] == 1 and metrics["optimizer_steps"] == 0
    assert metrics["micro_steps"] == 0 and metrics["items"] == 0
    assert all(p.grad is None for p in model.parameters())
    assert_close_lists([p.detach() for p in model.parameters()], start)
    for j in range(2):  # the next logical batch is clean and closes normally
        x, y = make_batch(10 + j, 4)
        with ctl.accumulate():
            nn.functional.mse_loss(model(x), y).backward()
    assert ctl.ready and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert ctl.metrics()["optimizer_steps"] == 1


# --- resume --------------------------------------------------------------------------


def run_lbs(model, opt, ctl, start_micro: int, steps: int, save_at: int | None = None) -> tuple:
    j, saved = start_micro, None
    while ctl.metrics()["optimizer_steps"] < steps:
        x, y = make_batch(j, SIZES[j % len(SIZES)])
        with ctl.accumulate(num_items=len(x)):
            (model(x) - y).pow(2).sum().backward()
        j += 1
        if ctl.ready:
            opt.step()
            opt.zero_grad()
            opt.param_groups[0]["logical_batch_size"] += 3  # a schedule, by hand
            if ctl.metrics()["optimizer_steps"] == save_at:
                saved = copy.deepcopy(
                    {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "ctl": ctl.state_dict(),
                        "j": j,
                    }
                )
    return j, saved


def test_resume_from_state_dict_equals_the_uninterrupted_run() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 6)
    _, saved = run_lbs(model, opt, LogicalBatchSize(model, opt), 0, 6, save_at=3)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    model.load_state_dict(saved["model"])
    opt = sgd_with(model, "logical_batch_size", 0)
    opt.load_state_dict(saved["opt"])
    ctl = LogicalBatchSize(model, opt)
    ctl.load_state_dict(saved["ctl"])
    run_lbs(model, opt, ctl, saved["j"], 6)
    for a, b in zip(model.parameters(), uninterrupted):
        assert torch.equal(a.detach(), b)


# --- misuse ----------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 8)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module.*got str"):
        LogicalBatchSize("model", opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer.*got dict"):
        LogicalBatchSize(model, {})
    with pytest.raises(
        KeyError,
        match=r"key='logical_batch_sise' is in no optimizer param group "
        r"\(keys: .*'logical_batch_size'.*did you mean 'logical_batch_size'",
    ):
        LogicalBatchSize(model, opt, key="logical_batch_sise")
    with pytest.raises(KeyError, match="extend_optimizer"):
        GradientNormThreshold(model, opt)
    with pytest.raises(
        ValueError, match="requires micro_batch_size to be an integer >= 1, got micro_batch_size=0"
    ):
        LogicalBatchSize(model, opt, micro_batch_size=0)
    with pytest.raises(
        TypeError, match="requires micro_batch_size to be an integer >= 1, got micro_batch_size='4'"
    ):
        LogicalBatchSize(model, opt, micro_batch_size="4")
    with pytest.raises(
        TypeError,
        match="requires micro_batch_size to be an integer >= 1, got micro_batch_size=True",
    ):
        LogicalBatchSize(model, opt, micro_batch_size=True)
    opt.param_groups[0]["gradient_norm_threshold"] = 1.0
    with pytest.raises(
        ValueError,
        match="requires max_accumulation_steps to be an integer >= 1, got max_accumulation_steps=0",
    ):
        GradientNormThreshold(model, opt, max_accumulation_steps=0)
    with pytest.raises(
        TypeError,
        match=(
            "requires max_accumulation_steps to be an integer >= 1, got max_accumulation_steps=2.5"
        ),
    ):
        GradientNormThreshold(model, opt, max_accumulation_steps=2.5)
    with pytest.raises(ValueError, match="process_group=.* plain Sequential"):
        LogicalBatchSize(model, opt, process_group=object())


def test_misuse_of_accumulate_raises_clear_errors() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 8)
    x, y = make_batch(0, 4)
    ctl = LogicalBatchSize(model, opt)
    with pytest.raises(ValueError, match=r"accumulate\(num_items=None\) needs micro_batch_size"):
        with ctl.accumulate():
            pass
    with pytest.raises(
        ValueError, match="accumulate requires num_items to be an integer >= 0, got num_items=-1"
    ):
        with ctl.accumulate(num_items=-1):
            pass
    with pytest.raises(
        TypeError, match="accumulate requires num_items to be an integer >= 0, got num_items=2.5"
    ):
        with ctl.accumulate(num_items=2.5):
            pass

    ctl = LogicalBatchSize(model, opt, micro_batch_size=4)
    with ctl.accumulate(num_items=torch.tensor(4)):  # a 0-d integer tensor counts
        (model(x) - y).pow(2).sum().backward()
    with pytest.raises(ValueError, match="has run with num_items so far"):
        with ctl.accumulate():
            pass
    with pytest.raises(
        RuntimeError, match=r"state_dict\(\) called in the middle of a logical batch"
    ):
        ctl.state_dict()
    with pytest.raises(RuntimeError, match="cannot be nested"):
        with ctl.accumulate(num_items=4), ctl.accumulate(num_items=4):
            pass

    opt.param_groups[0]["logical_batch_size"] = float("nan")
    with pytest.raises(ValueError, match="'logical_batch_size' is nan"):
        with LogicalBatchSize(model, opt, micro_batch_size=4).accumulate():
            pass
    opt.param_groups[0]["logical_batch_size"] = "big"
    with pytest.raises(
        TypeError,
        match=r"param_groups\[0\]\['logical_batch_size'\] must be a real number, got 'big'",
    ):
        LogicalBatchSize(model, opt, micro_batch_size=4)


def test_an_exception_inside_accumulate_poisons_the_controller() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 8)
    ctl = LogicalBatchSize(model, opt, micro_batch_size=4)
    with pytest.raises(RuntimeError, match="shape") as info:
        with ctl.accumulate():
            model(torch.ones(4, 5, dtype=F64))
    assert any("raised inside LogicalBatchSize.accumulate()" in n for n in info.value.__notes__)
    with pytest.raises(RuntimeError, match="an earlier accumulate.* block raised"):
        with ctl.accumulate():
            pass


def test_state_dict_is_strict() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 8)
    opt.param_groups[0]["gradient_norm_threshold"] = 1.0
    sd = LogicalBatchSize(model, opt).state_dict()
    assert sd == {
        "controller": "LogicalBatchSize",
        "mode": None,
        "optimizer_steps": 0,
        "dropped_batches": 0,
    }
    with pytest.raises(KeyError, match=r"missing keys \['mode'\], unknown keys \['extra'\]"):
        LogicalBatchSize(model, opt).load_state_dict(
            {
                "controller": "LogicalBatchSize",
                "optimizer_steps": 0,
                "dropped_batches": 0,
                "extra": 1,
            }
        )
    with pytest.raises(ValueError, match="saved by 'LogicalBatchSize'"):
        GradientNormThreshold(model, opt).load_state_dict(sd)


def test_metrics_name_what_the_spec_promises() -> None:
    model = make_model()
    opt = sgd_with(model, "logical_batch_size", 8)
    opt.param_groups[0]["gradient_norm_threshold"] = 1.0
    assert set(LogicalBatchSize(model, opt).metrics()) == {
        "target",
        "micro_steps",
        "items",
        "optimizer_steps",
        "dropped_batches",
    }
    assert set(GradientNormThreshold(model, opt).metrics()) == {
        "grad_norm",
        "threshold",
        "micro_steps",
        "items",
        "optimizer_steps",
        "dropped_batches",
    }
    assert all(isinstance(v, float) for v in GradientNormThreshold(model, opt).metrics().values())


def test_a_plain_module_has_no_sync_to_switch() -> None:
    sync = GradientSync(make_model())
    assert sync.kind == "plain"
    with sync(enabled=False):
        pass


def test_exported_from_schedany_control() -> None:
    import schedany.control as control

    assert control.__all__ == ["GradientNormThreshold", "LogicalBatchSize"]
