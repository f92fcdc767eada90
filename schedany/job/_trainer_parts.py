"""What the trainer's helpers use of a :class:`~schedany.job.trainer.Trainer`.

Resuming (``_resume``), live control (``live``) and rebuilding a run (``rebuild``) work
on the trainer, which imports them; they name their argument with this Protocol rather
than import the trainer back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from torch import nn
from torch.optim import Optimizer

from .._clock import Clock
from .._synchronous import SynchronousSchedule
from ..config import TrainConfig
from ..control.guard import GradientGuard
from ._losses import TrainLoss
from ._step_flags import StepFlags
from .build import Controller
from .data import MicroBatchSampler


class LiveParts(Protocol):
    """What resuming asks of the trainer's live control (:class:`~schedany.job.live.
    LiveControl`)."""

    @property
    def cooldowns(self) -> Mapping[str, Any]: ...

    def config(self) -> TrainConfig: ...

    def restore(self, records: Iterable[Mapping[str, Any]], *, journal: bool) -> None: ...


class TrainerParts(Protocol):
    """The trainer's run: a rebuild replaces ``optimizer``, ``schedule``, ``controller``
    and ``guard``; a resume loads every part."""

    config: TrainConfig
    from_checkpoint: str | None
    rebuild_on_resume: bool
    model: nn.Module
    optimizer: Optimizer
    schedule: SynchronousSchedule
    clock: Clock
    controller: Controller
    guard: GradientGuard | None
    sampler: MicroBatchSampler
    train_loss: TrainLoss
    flags: StepFlags
    live: LiveParts
    step: int
