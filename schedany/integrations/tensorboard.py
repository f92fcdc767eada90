"""TensorBoard logging of every scheduled key, the control signals and training scalars.

Tags (SPEC section 7):

- ``schedule/<key>/<group>`` for every name in ``schedule.schedule_names`` and every
  param group; ``<group>`` is the group's ``name`` entry if it has one, else ``pg<i>``.
- ``control/<metric>`` for every entry of ``controller.metrics()``.
- any scalar the caller passes, under its own tag (``train/loss``).

Cost: the schedule values of one :meth:`ScheduleLogger.log` call go into a single event
record (one ``Summary`` with many values), not one record per tag as ``add_scalar``
writes (4 keys x 100 groups: ~20 ms per step that way). When the logger opens its own
writer (``log_dir``), that record and its checksum are encoded by
:class:`~schedany.integrations._tfevents.ScalarRecord` in ~0.05 ms, instead of ~1.6 ms
in TensorBoard's pure-Python CRC; a ``writer`` you pass in gets the plain record.
``add_scalars`` is never used (it makes one run directory per tag).

Needs the ``tensorboard`` package (``pip install schedany[tensorboard]``); importing
:mod:`schedany` does not import this module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from .._synchronous import SynchronousSchedule

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["ScheduleLogger", "group_labels", "schedule_tags", "custom_scalars_layout"]


class _Controller(Protocol):
    def metrics(self) -> Mapping[str, float]: ...


def group_labels(param_groups: list[dict[str, Any]]) -> list[str]:
    """The ``<group>`` part of the tags: each group's ``name`` entry, else ``pg<i>``.

    Raises ``ValueError`` when two groups get the same label (their curves would
    merge into one zig-zagging tag).
    """
    labels = [str(g["name"]) if g.get("name") is not None else f"pg{i}" for i, g in enumerate(param_groups)]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise ValueError(
                f"param_groups[{seen[label]}] and param_groups[{i}] both log as {label!r}; "
                f"give the groups distinct 'name' entries"
            )
        seen[label] = i
    return labels


def schedule_tags(schedule: SynchronousSchedule) -> dict[str, list[str]]:
    """``{key: ["schedule/<key>/<group>", ...]}`` in param-group order."""
    labels = group_labels(schedule.optimizer.param_groups)
    return {key: [f"schedule/{key}/{label}" for label in labels] for key in schedule.schedule_names}


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
        log_dir: folder for a new ``SummaryWriter`` (a local folder gets the fast
            event-file writer, a ``gs://``/``s3://`` URL TensorBoard's own); ``None``
            with no ``writer`` means torch's default ``runs/<date>_<host>``.
        writer: an existing ``SummaryWriter`` to write into instead (it stays open on
            :meth:`close`; the caller owns it). Not together with ``log_dir`` or
            ``purge_step``.
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
        controller: _Controller | None = None,
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
                f"ScheduleLogger: controller must have a metrics() method, got {type(controller).__name__}"
            )
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"ScheduleLogger: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if purge_step is not None and (
            not isinstance(purge_step, int) or isinstance(purge_step, bool) or purge_step < 0
        ):
            raise ValueError(f"ScheduleLogger: purge_step must be an integer >= 0, got {purge_step!r}")
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
        self._record: _FastRecord | _EventRecord | None = None  # built on the first write
        self._layout_written = False
        self._owns_writer = writer is None
        self._writer: SummaryWriter | None = None
        if not _is_rank_zero():
            return
        if writer is None:
            writer = _open_writer(log_dir, purge_step)
        self._writer = writer

    @property
    def enabled(self) -> bool:
        """True on the rank that writes (rank 0) until :meth:`close`."""
        return self._writer is not None

    @property
    def writer(self) -> SummaryWriter | None:
        """The underlying ``SummaryWriter`` (``None`` on other ranks or after close)."""
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
        if self._writer is None or step % self.every_n_steps:
            return
        file_writer = self._file_writer()
        walltime = time.time()
        self._write_schedule(file_writer, step, walltime)
        extras: list[tuple[str, float]] = []
        if self.controller is not None:
            extras.extend((f"control/{metric}", v) for metric, v in self.controller.metrics().items())
        if scalars:
            extras.extend(scalars.items())
        if extras:
            file_writer.add_event(_scalars_event(extras), step, walltime)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write only ``scalars`` at ``step``, whatever ``every_n_steps`` (e.g. ``eval/loss``)."""
        if self._writer is None or not scalars:
            return
        self._file_writer().add_event(_scalars_event(scalars.items()), step, time.time())

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this logger opened it. Later calls do nothing."""
        if self._writer is None:
            return
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()
        self._writer = None

    def __enter__(self) -> ScheduleLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _file_writer(self) -> Any:
        assert self._writer is not None
        if not self._layout_written:
            self._writer.add_custom_scalars(custom_scalars_layout(self.schedule))
            self._layout_written = True
        # SummaryWriter has no public call for one event of many values; its
        # _get_file_writer() (stable since torch 1.1, also reopens after close) does.
        return self._writer._get_file_writer()

    def _write_schedule(self, file_writer: Any, step: int, walltime: float) -> None:
        groups = self.schedule.optimizer.param_groups
        if self._record is None or len(groups) != self._num_groups:
            self._tags = schedule_tags(self.schedule)
            self._num_groups = len(groups)
            self._record = _schedule_record(file_writer, self.tags)
        values = [value for key in self._tags for value in self.schedule.get_last_schedule(key)]
        self._record.write(file_writer, values, step, walltime)


def _open_writer(log_dir: str | None, purge_step: int | None) -> SummaryWriter:
    if log_dir is not None and "://" in str(log_dir):
        # Remote storage (gs://, s3://) needs TensorBoard's own file layer.
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
    from ._tfevents import FastSummaryWriter

    return FastSummaryWriter(log_dir=log_dir, purge_step=purge_step)


class _FastRecord:
    """Writes pre-encoded records straight into a FastSummaryWriter's event file."""

    def __init__(self, tags: list[str]) -> None:
        from ._tfevents import ScalarRecord

        self._encoder = ScalarRecord(tags)

    def write(self, file_writer: Any, values: list[float], step: int, walltime: float) -> None:
        file_writer.event_writer.write_record(*self._encoder.encode(values, step, walltime))


class _EventRecord:
    """Any other SummaryWriter: one reusable Event, its values overwritten in place."""

    def __init__(self, tags: list[str]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event = Event(summary=Summary(value=[Summary.Value(tag=t) for t in tags]))
        self._slots = list(self._event.summary.value)

    def write(self, file_writer: Any, values: list[float], step: int, walltime: float) -> None:
        for slot, value in zip(self._slots, values, strict=True):
            slot.simple_value = value
        file_writer.add_event(self._event, step, walltime)


def _schedule_record(file_writer: Any, tags: list[str]) -> _FastRecord | _EventRecord:
    from ._tfevents import MAX_FAST_VALUES, EventFileWriter

    fast = isinstance(getattr(file_writer, "event_writer", None), EventFileWriter)
    return _FastRecord(tags) if fast and len(tags) <= MAX_FAST_VALUES else _EventRecord(tags)


def _scalars_event(items: Any) -> Any:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Event(
        summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in items])
    )

