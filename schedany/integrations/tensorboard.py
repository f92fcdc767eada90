"""TensorBoard logging of every scheduled key, the control signals and training scalars.

Tags (docs/inspecting_schedules.md; the core names them, this module only writes them):

- ``schedule/<key>/<group>`` for every name in ``schedule.schedule_names`` and every
  param group; ``<group>`` is the group's ``name`` entry if it has one, else ``pg<i>``.
- ``control/<metric>`` for every entry of ``controller.metrics()``.
- any scalar the caller passes, under its own tag (``train/loss``);
- text under a tag of the caller's (:meth:`ScheduleLogger.log_text`; the job's
  ``control/edits``).

Cost: with ``log_dir``, the values of one :meth:`ScheduleLogger.log` call go into a
single event record (one ``Summary`` with many values), written synchronously by
tensorboardX's ``RecordWriter``, which checksums with the C ``crc32c`` package: about
0.2 ms of CPU per call for 400 values, reading the schedule included, where
TensorBoard's own writer spends ~1.6 ms in a pure-Python CRC alone. A ``writer`` you
pass in gets one ``add_scalar`` per tag, its public API (~30 ms for 400 tags).
``add_scalars`` is never used (it makes one run directory per tag).

:func:`write_hparams` gives a run its hyperparameters for the HParams tab (each Tune
trial's run gets its searched values, docs/integrations.md).

Needs ``tensorboardX`` and ``crc32c`` (``pip install schedany[tensorboard]``);
importing :mod:`schedany` does not import this module.
"""

from __future__ import annotations

import itertools
import json
import numbers
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from .._record import Controller, StepRecord, schedule_tags
from .._synchronous import SynchronousSchedule
from ..errors import check_integer

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["ScheduleLogger", "custom_scalars_layout", "write_hparams"]

_FLUSH_SECS = 120.0
"""Like SummaryWriter's ``flush_secs``: what was written reaches TensorBoard this soon."""
_file_ids = itertools.count()


def custom_scalars_layout(schedule: SynchronousSchedule) -> dict[str, dict[str, list[Any]]]:
    """One multiline chart per scheduled key holding all its groups (Custom Scalars tab).

    Chart entries are regular expressions, hence the escaping (``betas[0]``).
    """
    return {
        "schedule": {
            key: ["Multiline", ["^" + re.escape(f"schedule/{key}/")]]
            for key in schedule.schedule_names
        }
    }


def write_hparams(
    log_dir: str | os.PathLike[str], hparams: Mapping[str, Any], metrics: Sequence[str]
) -> None:
    """Give the TensorBoard run in ``log_dir`` its hyperparameters, for the HParams tab.

    ``hparams``: the run's values (numbers, strings and booleans as they are, anything
    else as its JSON text). ``metrics``: scalar tags the run writes (``eval/loss``); the
    HParams tab shows each at its last value. The summaries go into a new event file in
    ``log_dir``, which TensorBoard reads as part of the same run: the scalars and the
    HParams stay one run (``SummaryWriter.add_hparams`` would add a sub-run). Every run
    of a sweep writes the same hyperparameter names and metrics, so the tab compares
    them. Written on rank 0 only; the first values a run was given are the ones shown.
    """
    if not _is_rank_zero():
        return
    from tensorboardX.summary import hparams as hparams_summaries

    values = {name: _hparam_value(value) for name, value in hparams.items()}
    experiment, session_start, _ = hparams_summaries(values, dict.fromkeys(metrics, 0.0))
    file = _EventFile(os.fspath(log_dir), None)
    try:
        file.write_summary(experiment)
        file.write_summary(session_start)
    finally:
        file.close()


def _hparam_value(value: Any) -> bool | float | str:
    """What an HParams column can hold: a bool, a number or a string."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Real):  # numpy numbers too
        return float(value)
    return json.dumps(value, sort_keys=True, default=str)


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ScheduleLogger:
    """Writes every scheduled value (and control signals, and your scalars) to TensorBoard.

    :meth:`log` writes what the schedule holds when it is called. Call it between
    ``optimizer.step()`` and ``schedule.step()`` and the point at ``step`` is the value
    that optimizer step used. The reference trainer and ``schedany preview`` count
    optimizer steps from 1; a resumed run goes on counting where the checkpoint was.

    Only rank 0 writes. On every other rank (``torch.distributed`` initialized, rank
    != 0) the logger does nothing and never touches the file system, so build it after
    ``init_process_group``.

    Args:
        schedule: the :class:`~schedany.SynchronousSchedule` to read (a single torch
            scheduler is wrapped in one).
        controller: optional object with ``metrics() -> dict[str, float]``
            (:class:`~schedany.LogicalBatchSize`, :class:`~schedany.GradientNormThreshold`).
        log_dir: folder for a new event file (``gs://``/``s3://`` URLs work where
            tensorboardX's remote writers are installed); ``None`` with no ``writer``
            means torch's default ``runs/<date>_<host>``.
        writer: an existing ``SummaryWriter`` (torch's or tensorboardX's) to write into
            instead, through its ``add_scalar`` (it stays open on :meth:`close`; the
            caller owns it). Not together with ``log_dir`` or ``purge_step``.
        every_n_steps: write only when ``step % every_n_steps == 0``.
        purge_step: when resuming at step ``s`` into an existing ``log_dir``, pass
            ``s``: TensorBoard then drops the earlier run's points at steps ``>= s``,
            so the curve stays one line with no duplicates.

    Example:
        >>> with ScheduleLogger(schedule, log_dir="runs/a") as logger:  # doctest: +SKIP
        ...     for step in range(1, steps + 1):
        ...         loss = forward_backward(model, next(batches))
        ...         optimizer.step(); optimizer.zero_grad()
        ...         logger.log(step, {"train/loss": loss.item()})  # what this step used
        ...         schedule.step()
    """

    def __init__(
        self,
        schedule: SynchronousSchedule | LRScheduler,
        controller: Controller | None = None,
        *,
        log_dir: str | None = None,
        writer: SummaryWriter | None = None,
        every_n_steps: int = 1,
        purge_step: int | None = None,
    ) -> None:
        if not isinstance(schedule, SynchronousSchedule):
            if not isinstance(schedule, LRScheduler):
                raise TypeError(
                    f"ScheduleLogger: schedule must be a SynchronousSchedule or a torch "
                    f"LRScheduler, got {type(schedule).__name__}"
                )
            schedule = SynchronousSchedule([schedule])
        if controller is not None and not callable(getattr(controller, "metrics", None)):
            raise TypeError(
                "ScheduleLogger: controller must have a metrics() method, "
                f"got {type(controller).__name__}"
            )
        check_integer(every_n_steps, "every_n_steps", min=1, func="ScheduleLogger")
        if purge_step is not None:
            check_integer(purge_step, "purge_step", min=0, func="ScheduleLogger")
        if writer is not None and (log_dir is not None or purge_step is not None):
            raise ValueError(
                "ScheduleLogger: pass either writer= or log_dir=/purge_step=, not both "
                "(purge_step takes effect when a writer opens; give it to SummaryWriter yourself)"
            )
        self.schedule = schedule
        self.controller = controller
        self.every_n_steps = every_n_steps
        self._tags = schedule_tags(schedule)  # validates group labels on every rank alike
        self._num_groups = len(schedule.optimizer.param_groups)
        self._writer: SummaryWriter | None = None
        self._file: _EventFile | None = None
        if not _is_rank_zero():
            return
        layout = custom_scalars_layout(schedule)
        if writer is not None:
            writer.add_custom_scalars(layout)
            self._writer = writer
        else:
            self._file = _EventFile(log_dir or _default_log_dir(), purge_step)
            self._file.write_layout(layout)

    @property
    def enabled(self) -> bool:
        """True on the rank that writes (rank 0) until :meth:`close`."""
        return self._writer is not None or self._file is not None

    @property
    def writer(self) -> SummaryWriter | None:
        """The ``SummaryWriter`` passed as ``writer=`` (``None`` without one, on other
        ranks, or after close)."""
        return self._writer

    @property
    def tags(self) -> list[str]:
        """Every ``schedule/<key>/<group>`` tag, key by key, groups in order."""
        return [tag for tags in self._tags.values() for tag in tags]

    def log(self, step: int, scalars: Mapping[str, float] | None = None) -> None:
        """Write the scheduled values, controller metrics and ``scalars`` at ``step``.

        Does nothing on ranks other than 0 and on steps that are not a multiple of
        ``every_n_steps``. Tensor scalars are converted with ``float()`` (a device
        sync on GPU); pass Python floats where that matters.
        """
        if not self.enabled or step % self.every_n_steps:
            return
        if len(self.schedule.optimizer.param_groups) != self._num_groups:  # add_param_group
            self._tags = schedule_tags(self.schedule)
            self._num_groups = len(self.schedule.optimizer.param_groups)
        values = StepRecord.read(self.schedule, self.controller).scalars(self._tags)
        self.log_scalars(step, {**values, **(scalars or {})})

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write only ``scalars`` at ``step``, whatever ``every_n_steps`` (e.g. ``eval/loss``)."""
        if not scalars:
            return
        walltime = time.time()
        if self._file is not None:
            self._file.write_scalars(step, scalars, walltime)
        elif self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), step, walltime=walltime)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Write ``text`` (markdown) under ``tag`` at ``step`` (TensorBoard's Text tab).
        The reference job writes each live edit as ``control/edits``. A ``writer`` passed
        in gets ``add_text``, which files it as ``<tag>/text_summary``."""
        if self._file is not None:
            self._file.write_text(step, tag, text, time.time())
        elif self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush; close the event file if this logger opened it. Later calls do nothing."""
        if self._file is not None:
            self._file.close()
        elif self._writer is not None:
            self._writer.flush()
        self._file = self._writer = None

    def __enter__(self) -> ScheduleLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _default_log_dir() -> str:
    """``runs/<date>_<host>``, SummaryWriter's default folder."""
    return os.path.join("runs", time.strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname())


class _EventFile:
    """One new TensorBoard event file, written synchronously (no thread, so a flush
    before a checkpoint really has every point on disk).

    The framing and checksums are tensorboardX's ``RecordWriter``; the file layout is
    TensorBoard's: a ``file_version`` event first, then one event per call, in a file
    whose name holds ``tfevents``.
    """

    def __init__(self, log_dir: str, purge_step: int | None) -> None:
        from tensorboardX import RecordWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import directory_check

        log_dir = str(log_dir)
        directory_check(log_dir)  # a local folder is made; gs:// and s3:// go to their writers
        # TensorBoard reads a folder's files in name order; the zero-padded counter keeps
        # two files of one process opened in the same second in opening order, and the
        # pid keeps processes from clobbering each other's files.
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_file_ids):06d}.schedany"
        )
        self._records = RecordWriter(os.path.join(log_dir, name))
        self._templates: dict[tuple[str, ...], tuple[Any, list[Any]]] = {}
        self._last_flush = time.monotonic()
        now = time.time()
        self._write(Event(wall_time=now, file_version="brain.Event:2"))
        if purge_step is not None:
            # TensorBoard drops earlier points at steps >= purge_step when it reads this.
            self._write(Event(wall_time=now, step=purge_step, file_version="brain.Event:2"))
            self._write(
                Event(
                    wall_time=now, step=purge_step, session_log=SessionLog(status=SessionLog.START)
                )
            )
        self.flush()

    def write_layout(self, layout: dict[str, dict[str, list[Any]]]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import custom_scalars

        self._write(Event(wall_time=time.time(), summary=custom_scalars(layout)))

    def write_summary(self, summary: Any) -> None:
        """One event holding a tensorboardX ``Summary`` (the HParams plugin's)."""
        from tensorboardX.proto.event_pb2 import Event

        self._write(Event(wall_time=time.time(), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, float], walltime: float) -> None:
        """One event holding every value of ``scalars``."""
        tags = tuple(scalars)
        template = self._templates.get(tags)
        if template is None:
            # Building 400 Summary.Values costs ~0.5 ms; filling in a kept event ~0.05 ms.
            # A run writes few distinct tag sets (with and without the losses).
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary

            if len(self._templates) >= 8:
                self._templates.clear()
            event = Event(summary=Summary(value=[Summary.Value(tag=tag) for tag in tags]))
            template = self._templates[tags] = (event, list(event.summary.value))
        event, slots = template
        for slot, value in zip(slots, scalars.values()):
            slot.simple_value = float(value)
        event.step = step
        event.wall_time = walltime
        self._write(event)

    def write_text(self, step: int, tag: str, text: str, walltime: float) -> None:
        """One event holding ``text``: the summary tensorboardX's ``add_text`` builds."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import text as text_summary

        summary = text_summary(tag, text)
        summary.value[0].tag = tag  # not add_text's `<tag>/text_summary`: the tag asked for
        self._write(Event(summary=summary, step=step, wall_time=walltime))
        self.flush()  # rare, and worth seeing at once

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        if time.monotonic() - self._last_flush > _FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self._records.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._records.flush()
        self._records.close()
