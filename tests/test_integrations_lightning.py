"""Lightning: ScheduleMonitor with a real Trainer, and GNTS under Lightning's DDP.

The monitor's CSV is read back and compared with what the optimizer held when it
stepped (the LightningModule's own ``on_before_optimizer_step``, which runs right
after the callbacks'). The DDP test runs ``examples/lightning_gnts.py`` on two CPU
processes: its Lightning run and a plain-torch DDP loop on the same data, whose
decisions and parameters must agree.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (schedany[lightning])")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.optim.lr_scheduler import StepLR  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import schedany  # noqa: E402
from schedany.curves import warmup_anneal_curve  # noqa: E402
from schedany.integrations.lightning import ScheduleMonitor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
KEYS = ("lr", "weight_decay", "betas[0]", "noise_floor")
LABELS = ("body", "pg1")


def read_csv(log_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


class FourKeys(pl.LightningModule):
    """A linear model whose optimizer has two param groups and four scheduled keys."""

    def __init__(self, automatic: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)
        self.automatic_optimization = automatic
        self.used: dict[int, dict[str, list[float]]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        (x,) = batch
        loss = self.head(torch.tanh(self.body(x))).pow(2).mean()
        if self.automatic_optimization:
            return loss
        opt, schedule = self.optimizers(), self.lr_schedulers()
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        schedule.step()
        return None

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            [
                {"params": self.body.parameters(), "name": "body"},
                {"params": self.head.parameters(), "lr": 2e-2},
            ],
            lr=1e-2,
            weight_decay=0.1,
        )
        schedany.extend_optimizer(opt, "noise_floor", 1.0)
        schedule = schedany.SynchronousSchedule(
            [
                schedany.cosine_annealing_with_warmup(opt, 1.0, 0.1, 5, STEPS),
                schedany.arbitrary_schedule_factory(
                    opt, lambda o: StepLR(o, step_size=3, gamma=0.5), schedule_target="weight_decay"
                ),
                schedany.linear_schedule_with_warmup(
                    opt, 1.0, 0.9, 0, STEPS, schedule_target="betas[0]"
                ),
                schedany.quadratic_schedule_with_warmup(
                    opt, 1.0, 0.0, 4, STEPS, schedule_target="noise_floor"
                ),
            ]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        groups = optimizer.param_groups
        self.used[self.trainer.global_step] = {
            "lr": [g["lr"] for g in groups],
            "weight_decay": [g["weight_decay"] for g in groups],
            "betas[0]": [g["betas"][0] for g in groups],
            "noise_floor": [g["noise_floor"] for g in groups],
        }


def fit(module: pl.LightningModule, log_dir: Path, **trainer_args: Any) -> pl.Trainer:
    data = DataLoader(TensorDataset(torch.randn(2 * STEPS, 4)), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=CSVLogger(str(log_dir), name="run"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer_args,
    )
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "manual"])
def test_monitor_logs_every_key_with_the_values_each_step_used(
    tmp_path: Path, automatic: bool
) -> None:
    module = FourKeys(automatic)
    trainer = fit(module, tmp_path, callbacks=[ScheduleMonitor()], log_every_n_steps=1)
    rows = [r for r in read_csv(trainer.logger.log_dir) if r.get("schedule/lr/body")]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    assert sorted(module.used) == list(range(STEPS))
    for row in rows:
        used = module.used[int(row["step"])]
        for key in KEYS:
            for g, label in enumerate(LABELS):
                assert float(row[f"schedule/{key}/{label}"]) == used[key][g], (key, label, row)
    # ...and those are the schedules' values: step s (0-based) used t = s.
    lr = warmup_anneal_curve(
        warmup_to_value=1.0, anneal_to_value=0.1, num_warmup_steps=5, num_training_steps=STEPS
    )
    for row in rows:
        s = int(row["step"])
        assert float(row["schedule/lr/pg1"]) == pytest.approx(2e-2 * lr(s), rel=1e-12)
        assert float(row["schedule/weight_decay/body"]) == pytest.approx(0.1 * 0.5 ** (s // 3))


def test_monitor_follows_log_every_n_steps_and_logs_a_controller(tmp_path: Path) -> None:
    module = FourKeys()

    class Counter:
        def __init__(self) -> None:
            self.calls = 0

        def metrics(self) -> dict[str, float]:
            self.calls += 1
            return {"calls": float(self.calls)}

    module.counter = Counter()
    trainer = fit(
        module, tmp_path, callbacks=[ScheduleMonitor(controller="counter")], log_every_n_steps=5
    )
    rows = [r for r in read_csv(trainer.logger.log_dir) if r.get("schedule/lr/body")]
    # Lightning's own cadence: the steps s with (s + 1) % 5 == 0.
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]
    assert [float(r["control/calls"]) for r in rows] == [1.0, 2.0, 3.0, 4.0]


def test_monitor_rejects_colliding_names_and_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="controller must have a metrics"):
        ScheduleMonitor(controller=3)  # type: ignore[arg-type]

    class TwoOptimizers(FourKeys):
        def configure_optimizers(self) -> Any:
            a = torch.optim.SGD(self.body.parameters(), lr=0.1)
            b = torch.optim.SGD(self.head.parameters(), lr=0.1)
            return [a, b], [StepLR(a, 1), StepLR(b, 1)]

    module = TwoOptimizers(automatic=False)
    with pytest.raises(ValueError, match=r"both log 'schedule/lr/pg0'.*distinct 'name'"):
        fit(module, tmp_path, callbacks=[ScheduleMonitor()])


def test_a_bound_scheduler_is_returned_inside_a_synchronous_schedule(tmp_path: Path) -> None:
    """Lightning checks ``scheduler.optimizer`` against the optimizers it was given; a
    bound scheduler holds a proxy, a SynchronousSchedule holds the optimizer."""

    class BoundOnly(FourKeys):
        def __init__(self, wrap: bool) -> None:
            super().__init__()
            self.wrap = wrap

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=0.5)
            bound = schedany.arbitrary_schedule_factory(
                opt, lambda o: StepLR(o, 2, 0.5), schedule_target="weight_decay"
            )
            scheduler = schedany.SynchronousSchedule([bound]) if self.wrap else bound
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            pass  # SGD has no betas to record

    trainer = fit(
        BoundOnly(wrap=True), tmp_path, callbacks=[ScheduleMonitor()], log_every_n_steps=1
    )
    rows = [r for r in read_csv(trainer.logger.log_dir) if r.get("schedule/weight_decay/pg0")]
    assert [float(r["schedule/weight_decay/pg0"]) for r in rows] == [
        0.5 * 0.5 ** (s // 2) for s in range(STEPS)
    ]
    with pytest.raises(Exception, match="optimizer that wasn't returned"):
        fit(BoundOnly(wrap=False), tmp_path / "bare")


@pytest.mark.slow
def test_import_schedany_imports_neither_trainer() -> None:
    code = (
        "import sys, schedany, schedany.integrations; "
        "assert not {'lightning', 'pytorch_lightning', 'transformers'} & set(sys.modules)"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


# --- GNTS under Lightning DDP ------------------------------------------------------------


@pytest.mark.slow
def test_gnts_under_lightning_ddp_equals_the_plain_torch_ddp_loop(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "lightning_gnts.py"),
            "--out",
            str(tmp_path),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {
        (kind, rank): json.loads((tmp_path / f"{kind}_rank{rank}.json").read_text())
        for kind in ("lightning", "torch")
        for rank in (0, 1)
    }
    reference = runs["torch", 0]
    decisions = reference["decisions"]
    for (kind, rank), run in runs.items():
        assert run["world_size"] == 2, (kind, rank)
        assert run["decisions"] == decisions, (kind, rank)
        assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-6)
        for got, want in zip(run["params"], reference["params"], strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)
    # The monitor logged every optimizer step's threshold and the controller's metrics.
    metrics = list(csv.DictReader((tmp_path / "lightning_logs" / "metrics.csv").open()))
    rows = [r for r in metrics if r.get("control/grad_norm")]
    assert len(rows) == decisions.count(True)
    # The falling threshold makes both kinds of decision happen: under the threshold
    # after one micro-batch, and at max_accumulation_steps.
    micro_steps = {float(r["control/micro_steps"]) for r in rows}
    assert {1.0, reference["max_accumulation_steps"]} <= micro_steps
    for row, norm in zip(rows, [n for n, d in zip(reference["grad_norms"], decisions) if d]):
        assert float(row["control/grad_norm"]) == pytest.approx(norm, rel=1e-6)
        assert float(row["control/grad_norm"]) <= float(row["control/threshold"]) or math.isclose(
            float(row["control/micro_steps"]), reference["max_accumulation_steps"]
        )
        assert float(row["schedule/gradient_norm_threshold/pg0"]) == float(row["control/threshold"])
