"""Hugging Face Trainer: ScheduleCallback with a real Trainer and a tiny GPT-2 built from
a config (random weights, nothing downloaded); ``state.log_history`` is checked against
each schedule's closed form at the step it was logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (schedany[transformers])")
pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate")

from torch.optim.lr_scheduler import StepLR  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import schedany  # noqa: E402
from schedany import curves  # noqa: E402
from schedany.integrations.transformers import ScheduleCallback  # noqa: E402

STEPS = 8
LR = 1e-3
NO_DROPOUT = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32,
        n_positions=8,
        n_embd=16,
        n_layer=1,
        n_head=2,
        **dict.fromkeys(NO_DROPOUT, 0.0),
    )
    return GPT2LMHeadModel(config)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 32, (2 * STEPS, 8), generator=g)
    return [{"input_ids": r, "labels": r} for r in rows]


def train(tmp_path: Path, model: Any, optimizers: tuple[Any, Any], **args: Any) -> Trainer:
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=STEPS,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **args,
        ),
        train_dataset=dataset(),
        optimizers=optimizers,
        callbacks=[ScheduleCallback()],
    )
    trainer.train()
    return trainer


def training_logs(trainer: Trainer) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


def test_log_history_holds_every_scheduled_key(tmp_path: Path) -> None:
    model = tiny_model()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        weight_decay=0.1,
    )
    schedany.extend_optimizer(opt, "noise_floor", 2.0)
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(opt, 1.0, 0.1, 3, STEPS),
            schedany.arbitrary_schedule_factory(
                opt, lambda o: StepLR(o, step_size=2, gamma=0.5), schedule_target="weight_decay"
            ),
            schedany.linear_schedule_with_warmup(
                opt, 1.0, 0.95, 0, STEPS, schedule_target="betas[0]"
            ),
            schedany.sqrt_schedule_with_warmup(
                opt, 1.0, 0.0, 2, STEPS, schedule_target="noise_floor"
            ),
        ]
    )
    trainer = train(tmp_path, model, (opt, schedule), gradient_accumulation_steps=2)
    logs = training_logs(trainer)
    assert sorted(logs) == list(range(1, STEPS + 1))
    shapes = {
        "lr": curves.cosine_annealing_with_warmup(1.0, 0.1, 3, STEPS),
        "betas[0]": curves.linear_schedule_with_warmup(1.0, 0.95, 0, STEPS),
        "noise_floor": curves.sqrt_schedule_with_warmup(1.0, 0.0, 2, STEPS),
    }
    initial = {"lr": (LR, LR), "betas[0]": (0.9, 0.9), "noise_floor": (2.0, 2.0)}
    for step, log in logs.items():
        t = step - 1  # optimizer step `step` used the schedules at t = step - 1
        for key, curve in shapes.items():
            for label, start in zip(("decay", "pg1"), initial[key]):
                want = start * curve(t)
                assert log[f"schedule/{key}/{label}"] == pytest.approx(want, rel=1e-12), (key, t)
        assert log["schedule/weight_decay/decay"] == pytest.approx(0.1 * 0.5 ** (t // 2))
        assert log["schedule/weight_decay/pg1"] == 0.0
        assert log["learning_rate"] == log["schedule/lr/decay"]


def test_a_bound_weight_decay_scheduler_is_not_logged_as_the_learning_rate(
    tmp_path: Path,
) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.4)
    bound = schedany.arbitrary_schedule_factory(
        opt, lambda o: StepLR(o, step_size=1, gamma=0.5), schedule_target="weight_decay"
    )
    seen: list[float] = []

    class BeforeUs(TrainerCallback):
        """Records what the Trainer itself put in the logs (it runs before ours)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "learning_rate" in logs:
                seen.append(logs["learning_rate"])

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=dataset(),
        optimizers=(opt, bound),
        callbacks=[BeforeUs(), ScheduleCallback()],
    )
    trainer.train()
    logs = training_logs(trainer)
    decay = [0.4 * 0.5**t for t in range(4)]
    assert seen == pytest.approx(decay)  # the Trainer's own reading: the bound key
    assert [logs[s]["learning_rate"] for s in range(1, 5)] == [LR] * 4
    assert [logs[s]["schedule/weight_decay/pg0"] for s in range(1, 5)] == pytest.approx(decay)
    assert "schedule/lr/pg0" not in logs[1]
    # The Trainer stepped the bound scheduler itself: its values reached the optimizer
    # (the callback's reading of it must not take its writes over).
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.4 * 0.5**4)


def test_the_trainers_own_scheduler_logs_as_lr(tmp_path: Path) -> None:
    trainer = train(tmp_path, tiny_model(), (None, None), learning_rate=LR, warmup_steps=2)
    logs = training_logs(trainer)
    for log in logs.values():
        assert log["schedule/lr/pg0"] == log["learning_rate"]
    assert logs[1]["schedule/lr/pg0"] == 0.0 and logs[3]["schedule/lr/pg0"] == pytest.approx(LR)


def test_a_reactive_controller_trains_an_hf_model_in_a_custom_loop() -> None:
    """The custom loop of docs/integrations.md on the tiny GPT-2: GNTS (threshold 0, so
    every logical batch runs to max_accumulation_steps) steps with the mean gradient of
    its micro-batches, as one process averaging their losses by hand does."""
    model, reference = tiny_model(), tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    schedany.extend_optimizer(opt, "gradient_norm_threshold", 0.0)
    schedule = schedany.SynchronousSchedule([schedany.constant_schedule(opt, 1.0)])
    gnts = schedany.GradientNormThreshold(model, opt, max_accumulation_steps=3)
    rows = torch.stack([r["input_ids"] for r in dataset()])
    batches = [{"input_ids": rows[i : i + 2], "labels": rows[i : i + 2]} for i in range(0, 12, 2)]
    decisions = []
    for batch in batches:
        with gnts.accumulate():
            loss = model(**batch).loss
            loss.backward()
        decisions.append(gnts.ready)
        if gnts.ready:
            opt.step()
            opt.zero_grad()
            schedule.step()
    assert decisions == [False, False, True] * 2
    for logical_batch in (batches[:3], batches[3:]):
        (sum(reference(**b).loss for b in logical_batch) / 3).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
