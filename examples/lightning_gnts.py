"""Gradient norm threshold scheduling (GNTS) in Lightning, under Lightning's DDP.

    python examples/lightning_gnts.py                      # 2 CPU processes, gloo
    python examples/lightning_gnts.py --out DIR --check    # and the plain-torch DDP loop

The recipe (docs/integrations.md, "Reactive controllers in Lightning"):

- ``automatic_optimization = False``: the controller, not Lightning, decides when the
  optimizer steps.
- Build the controller in ``configure_optimizers`` on ``self.trainer.strategy.model``:
  Lightning has wrapped the module in DDP by then, and the controller must hold the
  wrapper, whose gradients are averaged over the ranks (on the LightningModule it would
  judge one rank's gradient).
- ``with gnts.accumulate():`` around the forward and ``self.manual_backward``; when
  ``gnts.ready``, step the optimizer, zero the gradients and step the schedule.

With ``--check`` each rank then runs the same training as a plain-torch DDP loop, in
the process group Lightning started, and writes both runs' decisions and parameters
to ``DIR/{lightning,torch}_rank<r>.json``; the test suite compares them.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import schedany
from schedany.integrations.lightning import ScheduleMonitor

MICRO_BATCHES = 24  # per rank
MICRO_BATCH_SIZE = 8
MAX_ACCUMULATION_STEPS = 4
KEY = "gradient_norm_threshold"


def make_net() -> nn.Module:
    torch.manual_seed(0)  # every rank and both runs start from the same weights
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def rank_data(rank: int) -> TensorDataset:
    """This rank's micro-batches: a noisy linear target, different on every rank."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(MICRO_BATCHES * MICRO_BATCH_SIZE, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.5 * torch.randn(len(x), 1, generator=g)
    return TensorDataset(x, y)


def make_optimizer(params: Any) -> tuple[torch.optim.Optimizer, schedany.SynchronousSchedule]:
    """SGD with a learning rate schedule and a falling gradient-norm threshold: early
    steps take one micro-batch, later ones accumulate until the mean gradient is small."""
    optimizer = torch.optim.SGD(params, lr=0.1)
    schedany.extend_optimizer(optimizer, KEY, 6.0)
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 0, 12),
            schedany.linear_schedule_with_warmup(optimizer, 1.0, 0.25, 0, 8, schedule_target=KEY),
        ]
    )
    return optimizer, schedule


class GNTSModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()
        self.gnts: schedany.GradientNormThreshold | None = None
        self.decisions: list[bool] = []
        self.grad_norms: list[float] = []

    def configure_optimizers(self) -> Any:
        optimizer, schedule = make_optimizer(self.parameters())
        # Lightning wrapped the module in DDP before calling this: hold the wrapper.
        self.gnts = schedany.GradientNormThreshold(
            self.trainer.strategy.model, optimizer, max_accumulation_steps=MAX_ACCUMULATION_STEPS
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        # Each rank reads its own data here, so the plain-torch loop can read the same.
        return DataLoader(rank_data(self.global_rank), batch_size=MICRO_BATCH_SIZE)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        assert self.gnts is not None
        with self.gnts.accumulate():
            loss = nn.functional.mse_loss(self.net(x), y)
            self.manual_backward(loss)
        self.decisions.append(self.gnts.ready)
        self.grad_norms.append(self.gnts.metrics()["grad_norm"])
        if self.gnts.ready:
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
        self.log("train/loss", loss)


def torch_ddp_loop(rank: int) -> dict[str, Any]:
    """The same training as a plain-torch DDP loop (docs/control_loops.md)."""
    model = DistributedDataParallel(make_net())
    optimizer, schedule = make_optimizer(model.parameters())
    gnts = schedany.GradientNormThreshold(
        model, optimizer, max_accumulation_steps=MAX_ACCUMULATION_STEPS
    )
    decisions, grad_norms = [], []
    for x, y in DataLoader(rank_data(rank), batch_size=MICRO_BATCH_SIZE):
        with gnts.accumulate():
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
        decisions.append(gnts.ready)
        grad_norms.append(gnts.metrics()["grad_norm"])
        if gnts.ready:
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    return result(model.module, decisions, grad_norms)


def result(net: nn.Module, decisions: list[bool], grad_norms: list[float]) -> dict[str, Any]:
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "decisions": decisions,
        "grad_norms": grad_norms,
        "params": [p.detach().tolist() for p in net.parameters()],
        "max_accumulation_steps": MAX_ACCUMULATION_STEPS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightning_gnts")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="also run the plain-torch loop")
    args = parser.parse_args()
    if args.check and args.devices < 2:
        parser.error("--check compares two DDP runs: it needs --devices 2 or more")
    torch.set_num_threads(1)
    module = GNTSModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",  # gloo on CPU; the other ranks re-run this script
        max_epochs=1,
        use_distributed_sampler=False,  # train_dataloader reads this rank's data itself
        logger=CSVLogger(args.out, name="lightning_logs", version=""),
        callbacks=[ScheduleMonitor(controller="gnts")],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    rank = trainer.global_rank
    runs = {"lightning": result(module.net, module.decisions, module.grad_norms)}
    if args.check:
        runs["torch"] = torch_ddp_loop(rank)
    os.makedirs(args.out, exist_ok=True)
    for kind, run in runs.items():
        with open(os.path.join(args.out, f"{kind}_rank{rank}.json"), "w") as f:
            json.dump(run, f)
    if rank == 0:
        steps = sum(module.decisions)
        print(f"{len(module.decisions)} micro-batches per rank, {steps} optimizer steps")


if __name__ == "__main__":
    main()
