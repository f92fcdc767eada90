"""The job's side of live control (docs/live_control.md): noticing queued edits,
agreeing on them, applying them on every rank at one optimizer-step boundary, and
recording them.

Per optimizer step, rank 0 lists the queue folder (one ``listdir``, no collective) and
raises the ``edits`` request of the trainer's :class:`~schedany.job._step_flags.StepFlags`
when something waits; the trainer's one agreement per step (a tiny all-reduce under
``torchrun``, shared with preemption) tells every rank. Only then does rank 0 read and
check the queued files and broadcast the good ones, and every rank applies them, in
queue order, at that same boundary: after the step's ``schedule.step()``, so the next
optimizer step is the first to use them. Rank 0 also rewrites ``control/status.json``,
at most every :data:`STATUS_EVERY_S` seconds (a clock read per step otherwise).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import yaml

from .._record import group_labels
from ..config import ConfigError, TrainConfig, config_to_dict, parse_config
from ..config.parsing import parse_override
from . import _channel as channel
from ._trainer_parts import TrainerParts
from .distributed import collective_device, is_rank0
from .edits import check_request, describe, effective_config, parse_request, resolve_cooldown
from .rebuild import Cooldown, rebuild_run

if TYPE_CHECKING:
    from ..integrations.tensorboard import ScheduleLogger

__all__ = ["STATUS_EVERY_S", "LiveControl"]

STATUS_EVERY_S = 0.5
"""Rank 0 rewrites ``control/status.json`` at most this often while stepping."""
EDITS_TAG = "control/edits"


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (one ``broadcast_object_list``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def _touches_schedules(record: Mapping[str, Any]) -> bool:
    if record["command"] == "cooldown":
        return True
    return record["command"] == "set" and any(
        parse_override(text)[0][0] == "schedules" for text in record["set"]
    )


class LiveControl:
    """One trainer's live control. Every rank holds one; rank 0 alone touches files,
    and only with a ``train.log_dir``, between :meth:`start` and :meth:`close`."""

    def __init__(self, trainer: TrainerParts) -> None:
        self.trainer = trainer
        self.base = config_to_dict(trainer.config)
        """The config the run started with, as plain data: edits apply on top of it."""
        self.data = copy.deepcopy(self.base)
        """The config after the applied edits, as plain data."""
        self.cooldowns: dict[str, Cooldown] = {}
        self.applied: list[dict[str, Any]] = []
        """Every applied edit's record, in order (checkpointed)."""
        self.replay: list[dict[str, Any]] = []
        """Edits of the journal after the resumed checkpoint, applied again at their steps."""
        self.stop_requested = False
        self.changed = False
        """Whether an edit was applied at the last boundary (budget or keys may differ)."""
        self._run_dir: Path | None = None
        self._queue: Path | None = None
        self._journal: Any = None
        self.logger: ScheduleLogger | None = None
        """Where applied edits also go, as TensorBoard text (set by the trainer)."""
        self._taken: dict[int, str] = {}
        self._next_status = 0.0

    # --- resume ---------------------------------------------------------------------

    def config(self) -> TrainConfig:
        return parse_config(copy.deepcopy(self.data))

    def restore(self, records: Iterable[Mapping[str, Any]], *, journal: bool) -> None:
        """On every rank, after loading a checkpoint: its ``records`` are the edits applied
        so far; with ``journal``, the edits that ``edits.jsonl`` holds after the
        checkpoint's step are applied again when the run reaches their steps."""
        self.applied = [dict(r) for r in records]
        self.data, self.cooldowns = effective_config(self.base, self.applied)
        tail: list[dict[str, Any]] = []
        log_dir = self.trainer.config.train.log_dir
        if journal and is_rank0() and log_dir is not None:
            journal_file = Path(log_dir) / channel.JOURNAL
            step = self.trainer.step
            tail = [
                r
                for r in channel.read_jsonl(journal_file)
                if isinstance(r.get("step"), int) and r["step"] > step
            ]
            # In the order they applied: by step, replays before new edits at one step.
            tail.sort(key=lambda r: r["step"])
        self.replay = _from_rank0(tail)

    # --- rank 0's files ---------------------------------------------------------------

    def start(self) -> None:
        """Start listening (rank 0 with a ``train.log_dir``): write ``config.yaml``, the
        journal of the edits so far, the listener and a first status."""
        log_dir = self.trainer.config.train.log_dir
        if not is_rank0() or log_dir is None:
            return
        run_dir = Path(log_dir)
        other, _ = channel.live_listener(run_dir)
        if other is not None and other.get("pid") != os.getpid():
            raise ConfigError(
                "train.log_dir",
                f"another run (pid {other['pid']} on {other['host']}) is writing to {run_dir}; "
                f"give this run its own log_dir, or remove {channel.listener_file(run_dir)} "
                "if that run is gone",
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        channel.make_private_dir(channel.control_dir(run_dir))
        channel.make_private_dir(channel.queue_dir(run_dir))
        channel.write_private(
            run_dir / channel.CONFIG, yaml.safe_dump(self.base, sort_keys=False).encode()
        )
        self._journal = channel.open_private_append(run_dir / channel.JOURNAL, truncate=True)
        for record in [*self.applied, *self.replay]:  # the replayed ones stay on record
            self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()
        self._run_dir, self._queue = run_dir, channel.queue_dir(run_dir)
        done = [e for e in channel.numbered(self._queue) if e[1] == "done"]
        for _, _, name in done[:-1]:  # the newest keeps the numbering going
            (self._queue / name).unlink(missing_ok=True)
        channel.write_private(
            channel.listener_file(run_dir), json.dumps(channel.this_listener()).encode()
        )
        self.write_status("running")

    def write_status(self, state: str) -> None:
        """``control/status.json``: what ``schedany control RUN_DIR status`` prints."""
        if self._run_dir is None:
            return
        t = self.trainer
        labels = group_labels(t.optimizer.param_groups)
        unit, budget = t.config.train.budget()
        body = {
            "state": state,
            "pid": os.getpid(),
            "step": t.step,
            "clock": t.clock.state_dict(),
            "budget": {unit: budget},
            "schedules": {
                key: dict(zip(labels, t.schedule.get_last_schedule(key)))
                for key in t.schedule.schedule_names
            },
            "cooldowns": {key: c.to_dict() for key, c in self.cooldowns.items()},
            "updated": time.time(),
        }
        path = channel.control_dir(self._run_dir) / channel.STATUS
        channel.write_private(path, json.dumps(body).encode())
        self._next_status = time.monotonic() + STATUS_EVERY_S

    def close(self) -> None:
        """Stop listening: a last status (``stopped``, ``finished`` or ``exited``), the
        listener removed."""
        if self._run_dir is None:
            return
        t = self.trainer
        unit, budget = t.config.train.budget()
        state = (
            "stopped"
            if self.stop_requested
            else "finished"
            if t.clock.read(unit) >= budget
            else "exited"
        )
        with contextlib.suppress(Exception):  # never hide why the run ended
            self.write_status(state)
        channel.listener_file(self._run_dir).unlink(missing_ok=True)
        self._journal.close()
        self._run_dir = self._queue = self._journal = self.logger = None

    # --- every optimizer step ---------------------------------------------------------

    def poll(self) -> None:
        """Rank 0, once per optimizer step: raise ``edits`` if a request waits."""
        if self._queue is None:
            return
        try:  # a run folder removed under the run does not stop it
            if channel.has_queued(self._queue):
                self.trainer.flags.raise_flag("edits")
            if time.monotonic() >= self._next_status:
                self.write_status("running")
        except OSError:
            self._next_status = time.monotonic() + STATUS_EVERY_S

    def at_boundary(self, agreed: frozenset[str]) -> None:
        """Every rank, after the step's agreement: apply the journal's edits due at this
        step, then, if ``edits`` was agreed, the queued ones."""
        self.changed = False
        step = self.trainer.step
        while self.replay and self.replay[0]["step"] <= step:
            record = self.replay.pop(0)
            if record["step"] == step:
                self._apply(record, journaled=True)
        if "edits" not in agreed:
            return
        t = self.trainer
        for seq, stamp, body in _from_rank0(self._take()):
            request = parse_request(body)  # checked on rank 0 already
            fields = {k: v for k, v in body.items() if k != "format"}
            record = {"seq": seq, **fields, "step": step, "clock": t.clock.state_dict()}
            record["time"] = stamp
            if request.command == "cooldown":
                assert request.target is not None
                cooldown = resolve_cooldown(
                    request,
                    t.config,
                    [float(b) for b in t.schedule.schedules[request.target].base_lrs],
                    t.schedule.get_last_schedule(request.target),
                    record["clock"],
                )
                record["cooldown"] = cooldown.to_dict()
            self._apply(record)

    def _take(self) -> list[tuple[int, str, dict[str, Any]]]:
        """Rank 0: ``(number, time, request)`` of every queued request, checked in order
        against the config the earlier ones leave; refused ones are logged and set
        aside. Other ranks: []."""
        if self._queue is None:
            return []
        self.trainer.flags.lower("edits")
        taken, data = [], self.data
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for number, kind, name in channel.numbered(self._queue):
            if kind != "json":
                continue
            try:
                request = parse_request(channel.read_request(self._queue / name))
                data, _ = check_request(request, data)
            except Exception as exc:  # a bad file never stops the run
                self._refuse(number, name, exc)
                continue
            taken.append((number, stamp, request.to_dict()))
            self._taken[number] = name
        return taken

    def _refuse(self, number: int, name: str, exc: Exception) -> None:
        assert self._queue is not None and self._run_dir is not None
        reason = str(exc) if isinstance(exc, (ConfigError, ValueError)) else repr(exc)
        print(f"schedany control: refused {name}: {reason}", file=sys.stderr, flush=True)
        entry = {"seq": number, "step": self.trainer.step, "reason": reason}
        with channel.open_private_append(
            channel.control_dir(self._run_dir) / channel.REFUSED, truncate=False
        ) as fh:
            fh.write(json.dumps(entry) + "\n")
        with contextlib.suppress(OSError):
            os.replace(self._queue / name, self._queue / f"{number:06d}.refused")

    def _apply(self, record: dict[str, Any], *, journaled: bool = False) -> None:
        """Apply one record on this rank (all ranks alike), then record it on rank 0
        (in the journal unless it is there already)."""
        t = self.trainer
        applied = [*self.applied, record]
        self.data, self.cooldowns = effective_config(self.base, applied)
        config = self.config()
        if _touches_schedules(record):
            rebuild_run(t, config, self.cooldowns)
        else:
            t.config = config
        if record["command"] == "stop":
            self.stop_requested = True
        self.applied = applied
        self.changed = True
        if self._run_dir is not None:
            self._record(record, journaled)

    def _record(self, record: dict[str, Any], journaled: bool) -> None:
        """Rank 0: the journal (on disk first), TensorBoard, the log, the status; then
        the queue file is put aside."""
        assert self._queue is not None
        line = json.dumps(record)
        if not journaled:
            self._journal.write(line + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
        t = self.trainer
        text = f"{describe(record)} (after step {record['step']})"
        if self.logger is not None:
            self.logger.log_text(
                t.clock.read(t.config.train.axis), EDITS_TAG, f"{text}\n\n    {line}"
            )
        print(f"schedany control: applied {text}", file=sys.stderr, flush=True)
        self.write_status("running")
        name = self._taken.pop(record["seq"], None)
        if name is not None:
            previous = [e for e in channel.numbered(self._queue) if e[1] == "done"]
            os.replace(self._queue / name, self._queue / f"{record['seq']:06d}.done")
            for _, _, old in previous:
                (self._queue / old).unlink(missing_ok=True)
