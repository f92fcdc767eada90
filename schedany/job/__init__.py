"""The reference training job (``schedany train CONFIG``).

- :func:`train` runs a :class:`~schedany.config.TrainConfig` (single process, or
  distributed under ``torchrun``) and resumes from its checkpoint folder;
  :class:`Trainer` is the same job in pieces.
- :mod:`schedany.job.build` builds model, optimizer, schedule and controller from a
  config; :func:`build_run` gives a throwaway optimizer + schedule without a model.

Building blocks live in :mod:`schedany.job.model`, :mod:`schedany.job.data`,
:mod:`schedany.job.checkpoint` and :mod:`schedany.job.distributed`.
"""

from .build import (
    build_controller,
    build_model,
    build_optimizer,
    build_run,
    trace_schedule,
)
from .trainer import Report, Trainer, TrainResult, train

__all__ = [
    "Report",
    "TrainResult",
    "Trainer",
    "build_controller",
    "build_model",
    "build_optimizer",
    "build_run",
    "trace_schedule",
    "train",
]
