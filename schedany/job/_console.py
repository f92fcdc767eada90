"""Rank 0's outputs of a run: the progress bar or log lines, and ``metrics.jsonl``,
both written from the step's :class:`~schedany._record.StepRecord`."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from .._record import StepRecord
    from .._synchronous import SynchronousSchedule
    from ..config import TrainConfig
    from ..integrations.tensorboard import ScheduleLogger


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_values(values: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {_number(v)}" for k, v in values.items())


def headline_values(
    record: StepRecord, micro_steps: int, losses: Mapping[str, float]
) -> dict[str, float]:
    """What a progress line shows: the losses, each scheduled key's first group (the
    controller's target among them) and the micro-steps of the step."""
    out = {**losses, **{key: values[0] for key, values in record.schedule.items()}}
    out["micro_steps"] = float(micro_steps)
    return out


class Console:
    """A tqdm bar (``bar``, or ``auto`` on a terminal) or plain lines, on rank 0 only."""

    def __init__(
        self,
        mode: Literal["auto", "bar", "lines", "none"],
        total: int | None,
        initial: int,
        enabled: bool,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled and mode != "none"
        self.total = total
        self._bar: Any = None
        self._started = time.perf_counter()
        self._start_step = initial
        want_bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        if self.enabled and want_bar:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional (schedany[progress])
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total, initial=initial, file=self.stream, dynamic_ncols=True, unit="step"
                )

    def update(self, postfix: Mapping[str, float] | None) -> None:
        """Advance the bar by one step; with ``postfix``, refresh its numbers."""
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _number(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(1)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One line per ``log_every`` steps when there is no bar."""
        if not self.enabled or self._bar is not None:
            return
        rate = (step - self._start_step) / max(time.perf_counter() - self._started, 1e-9)
        total = self.total or "?"
        self.print(f"step {step}/{total}  {format_values(values)}  ({rate:.2f} steps/s)")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MetricsFile:
    """``metrics.jsonl``: one JSON object per optimizer step (scheduled values, control
    metrics, and the losses when they were computed). On resume at step ``s`` the lines
    after ``s`` (written before a crash) are dropped, so the file reads as one run."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        kept: list[str] = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line from a crash
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w")  # noqa: SIM115 - closed in close()
        for line in kept:
            self._file.write(line + "\n")
        self._file.flush()

    def write(
        self, step: int, micro_steps: int, record: StepRecord, losses: Mapping[str, float]
    ) -> None:
        """One line: the values per key and group as the record holds them (float64),
        the controller's and the guard's metrics (when there are) and the losses
        computed this step."""
        line: dict[str, Any] = {
            "step": step,
            "micro_steps": micro_steps,
            "schedule": record.schedule,
        }
        if record.control is not None:
            line["control"] = record.control
        if record.clock is not None:
            line["clock"] = record.clock
        if record.guard is not None:
            line["guard"] = record.guard
        line.update(losses)
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()  # whole lines on disk as they come: a reader can follow the run

    def close(self) -> None:
        self._file.close()


def open_logs(
    config: TrainConfig,
    schedule: SynchronousSchedule,
    resumed_from: int | None,
    purge_step: int | None,
) -> tuple[MetricsFile, ScheduleLogger]:
    """Rank 0's files in ``train.log_dir``: ``metrics.jsonl`` (cut back to ``resumed_from``)
    and the TensorBoard events (events from ``purge_step`` on, written before a crash,
    are purged). ``config.yaml`` is live control's (:meth:`~schedany.job.live.LiveControl.
    start`)."""
    from ..integrations.tensorboard import ScheduleLogger

    assert config.train.log_dir is not None
    log_dir = Path(config.train.log_dir)
    metrics_file = MetricsFile(log_dir / "metrics.jsonl", resumed_from)
    logger = ScheduleLogger(schedule, log_dir=str(log_dir), purge_step=purge_step)
    return metrics_file, logger
