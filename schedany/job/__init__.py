"""The reference training job (``schedany train CONFIG``).

- :func:`train` runs a :class:`~schedany.config.TrainConfig` (single process, or
  distributed under ``torchrun``) and resumes from its checkpoint folder;
  :class:`Trainer` is the same job in pieces.
- :mod:`schedany.job.build` builds model, optimizer, schedule and controller from a
  config.

Building blocks live in :mod:`schedany.job.model`, :mod:`schedany.job.data`,
:mod:`schedany.job.checkpoint` and :mod:`schedany.job.distributed`; live control
(``schedany control``, docs/live_control.md) in :mod:`schedany.job.live` (the job's side),
:mod:`schedany.job.control` (the client) and :mod:`schedany.job.edits`, on the rebuild of
:mod:`schedany.job.rebuild` that ``--from`` and PBT's restore use too.
"""

from .build import build_controller, build_model, build_run
from .trainer import Report, Trainer, TrainResult, train

__all__ = [
    "Report",
    "TrainResult",
    "Trainer",
    "build_controller",
    "build_model",
    "build_run",
    "train",
]
