"""The reference training job: read it top to bottom.

One optimizer step = micro-batches until the controller is ready (one, without a
controller) and the guard lets the step through (a skipped step's data counts towards
the next one), ``optimizer.step()``, the clock advanced by the step's data, the step's
record (:class:`~schedany._record.StepRecord`), then ``schedule.step()``. Evaluation,
checkpoints, logs and ``report`` happen between optimizer steps and write that record.

Entry points: :func:`train` and ``schedany train CONFIG``. A run whose
``train.checkpoint_dir`` holds a checkpoint resumes from it exactly: model, optimizer,
schedule and clock, controller, data position and RNG state. SIGTERM or SIGUSR1 ends it
after a checkpoint of the step in progress, agreed on by every rank (docs/operations.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._clock import Clock
from .._record import StepRecord, schedule_tags
from ..config import ConfigError, TrainConfig
from . import checkpoint as ckpt
from ._faults import maybe_inject_fault
from ._losses import TrainLoss, evaluate
from ._preemption import PREEMPT, Preempted, preemption_signals
from ._resume import resume
from ._step_flags import StepFlags
from .build import build_controller, build_guard, build_model, build_run
from .data import MicroBatchSampler, eval_batches, load_corpus
from .distributed import RankFailure, init_distributed, is_rank0, teardown, wrap_model
from .live import LiveControl
from .model import loss as lm_loss

__all__ = [
    "Preempted",
    "RankFailure",
    "Report",
    "TrainResult",
    "Trainer",
    "train",
]

Report = Callable[[dict[str, float], "str | None"], None]
"""``report(metrics, checkpoint)``: called on rank 0 every ``train.log_every`` units of
``train.axis`` and after the last step. ``metrics`` holds ``global_step``, ``train/loss``
(mean over the steps since the last report), ``eval/loss`` (when evaluated at that
step), ``schedule/<key>/<group>``, ``control/<metric>``, ``guard/<metric>`` and
``clock/<unit>``. ``checkpoint`` is the path of the checkpoint written at that step, or None."""

_MAX_LOST_IN_A_ROW = 20
"""Logical batches dropped (non-finite gradients), or steps skipped by the guard, in a
row before the run stops: training has diverged."""


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    step: int
    """Optimizer steps done (``train.steps`` unless it was already done)."""
    train_loss: float | None
    """Mean train loss (per token) over the last report window."""
    eval_loss: float | None
    """Held-out loss at the end."""
    resumed_from: int | None
    """The checkpoint step the run resumed from, or None for a fresh start."""
    checkpoint: str | None
    """The last checkpoint written or loaded, or None."""
    stopped: bool = False
    """True when ``schedany control RUN_DIR stop`` ended the run (docs/live_control.md)."""


class Trainer:
    """The job's state and loop. :func:`train` is the usual way in; the pieces are
    public so the overhead benchmark can time :meth:`train_step` alone."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        report: Report | None = None,
        from_checkpoint: str | None = None,
    ) -> None:
        self.config = config
        self.report = report
        self.from_checkpoint = from_checkpoint
        """``--from``: start from this checkpoint when the run has none of its own."""
        self.rebuild_on_resume = False
        """Build the schedules from this config at the resumed clock (PBT's exploit)."""
        train_cfg = config.train
        self.timeout = timedelta(minutes=config.distributed.timeout_minutes)
        self.env = init_distributed(train_cfg.device, timeout=self.timeout)
        self.device = self.env.device
        # Requests that take effect at one optimizer step on every rank (_step_flags):
        # preemption signals and live-control edits.
        self.flags = StepFlags(PREEMPT, "edits", device=self.device)
        self.agreed: frozenset[str] = frozenset()
        torch.manual_seed(config.seed)
        random.seed(config.seed)

        model = build_model(config)
        self.model = wrap_model(model, config.distributed.strategy, self.env)
        # The clock counts what each optimizer step consumed, over all ranks; the
        # schedule follows it, and the budget and cadences are read from it.
        self.clock = Clock()
        self.optimizer, self.schedule = build_run(config, self.model, clock=self.clock)
        self.controller = build_controller(config, self.model, self.optimizer)
        self.guard = build_guard(config, self.model, self.optimizer)
        self.live = LiveControl(self)
        self.per_token = config.control.kind != "none" and config.control.items == "tokens"

        d, m = config.data, config.model
        try:
            corpus = load_corpus(d.path, suffixes=d.suffixes, max_bytes=d.max_bytes)
            train_docs, eval_docs = corpus.split(d.eval_fraction, seed=config.seed)
        except (OSError, ValueError) as exc:
            raise ConfigError("data.path", str(exc)) from None
        rank, world = self.env.rank, self.env.world_size
        self.sampler = MicroBatchSampler(
            train_docs,
            train_cfg.micro_batch_size,
            m.seq_len,
            seed=config.seed,
            rank=rank,
            world_size=world,
            min_len=d.min_len,
        )
        self.eval_set = eval_batches(
            eval_docs,
            d.eval_batch_size,
            m.seq_len,
            max_windows=d.eval_windows,
            rank=rank,
            world_size=world,
        )
        self.step = 0
        self.train_loss = TrainLoss(self.device)  # since the last report

    # --- one optimizer step ----------------------------------------------------------

    def train_step(self) -> tuple[StepRecord, int]:
        """Run micro-batches until the controller is ready and the guard passes, step the
        optimizer, record the values this step used, then step the schedule. Returns that
        record and the micro-batches the step took."""
        ctl, model, guard = self.controller, self.model, self.guard
        # Every batch this step drops or skips comes before its one stepped batch: in a row.
        dropped_before = 0.0 if ctl is None else ctl.metrics()["dropped_batches"]
        skipped_before = 0.0 if guard is None else guard.metrics()["skipped_steps"]
        micro_steps = samples = tokens = 0
        while True:
            batch = next(self.sampler).to(self.device, non_blocking=True)
            micro_steps += 1
            samples += batch.inputs.shape[0]
            tokens += batch.num_tokens
            if ctl is None:
                total, n = lm_loss(model, batch, "sum")
                (total / n).backward()
            else:
                with ctl.accumulate(num_items=batch.num_tokens if self.per_token else None):
                    total, n = lm_loss(model, batch, "sum")
                    (total if self.per_token else total / n).backward()
            self.train_loss.add(total, n)
            if ctl is None or ctl.ready:
                if guard is None or guard.apply():
                    break
                lost = guard.metrics()["skipped_steps"] - skipped_before
                why = f"optimizer steps in a row were skipped (gradient norm > {guard.skip_key!r})"
                _stop_if_diverged(lost, why, self.step)
            else:
                lost = ctl.metrics()["dropped_batches"] - dropped_before
                _stop_if_diverged(
                    lost, "logical batches in a row had non-finite gradients", self.step
                )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        control = None if ctl is None else ctl.metrics()
        dropped = control is not None and control["dropped_batches"] != dropped_before
        skipped = guard is not None and guard.metrics()["skipped_steps"] != skipped_before
        self.live.poll()  # rank 0: is an edit queued? (a listdir, no collective)
        self.clock.advance(*self._agree(samples, tokens, control, dropped or skipped))
        record = StepRecord.read(self.schedule, ctl, control, guard)  # what this step used
        self.schedule.step()
        self.live.at_boundary(self.agreed)  # edits apply here, on every rank alike
        return record, micro_steps

    def _agree(
        self, samples: int, tokens: int, control: dict[str, float] | None, dropped: bool
    ) -> tuple[int, int]:
        """This step's samples and tokens over all ranks (data of dropped batches and
        skipped steps included); sets :attr:`agreed`, the step flags raised on any rank.
        Every rank reads as many rows as the others, so samples need no exchange; the
        tokens are summed by a token-counting controller already (unless a batch was
        dropped or the step skipped), or ride on the flags' all-reduce: one small
        collective per step under torchrun, in all."""
        samples *= self.env.world_size
        if self.per_token and not dropped and control is not None:
            self.agreed = self.flags.agree().raised
            return samples, int(control["items"])
        self.agreed, (total_tokens,) = self.flags.agree((tokens,))
        return samples, total_tokens

    # --- evaluation --------------------------------------------------------------------

    def evaluate(self) -> float:
        """Per-token loss on the fixed held-out windows, over all ranks."""
        return evaluate(self.model, self.eval_set, self.device)

    # --- checkpoints -----------------------------------------------------------------------

    def _plain_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "guard": None if self.guard is None else self.guard.state_dict(),
            "data": self.sampler.state_dict(),
            "edits": self.live.applied,
            "loss_window": self.train_loss.window(),  # a resume's first report: same steps
        }

    def save_checkpoint(self) -> str:
        """Checkpoint at this optimizer-step boundary (collective under torchrun)."""
        directory = self.config.train.checkpoint_dir
        assert directory is not None
        ref = ckpt.save_checkpoint(
            directory,
            self.step,
            self.model,
            self.optimizer,
            self._plain_state(),
            # each rank's own record of the edits it applied (rank 0's is in the state)
            rank_state={"rng": ckpt.capture_rng_state(), "edits": self.live.applied},
            keep_last=self.config.train.keep_checkpoints,
        )
        return str(ref.path)

    def resume(self) -> str | None:
        """Load the newest valid checkpoint of ``train.checkpoint_dir``, else
        ``from_checkpoint``'s (see :mod:`schedany.job._resume`); returns its path or None.
        Checkpoints that exist but none valid: :class:`~schedany.job.checkpoint.CheckpointError`."""
        return resume(self)

    # --- the whole run ----------------------------------------------------------------

    def run(self) -> TrainResult:
        resumed = self.resume()
        cfg = self.config.train  # after resume(): the checkpoint's edits may set the budget
        resumed_from = self.step if resumed else None
        rank0 = is_rank0()
        from ._console import Console, headline_values, open_logs

        tags = schedule_tags(self.schedule)  # after resume(), which may replace the schedule
        unit, budget = cfg.budget()
        total = budget if unit == "steps" else None  # the bar counts steps
        console = Console(cfg.progress, total, self.step, rank0)
        metrics_file = logger = None
        train_loss = eval_loss = None
        last_checkpoint = resumed
        try:
            # config.yaml, edits.jsonl; `schedany control` may talk. First: it refuses a
            # log_dir that another run is writing to, before this one opens any file there.
            self.live.start()
            if rank0 and cfg.log_dir is not None:
                purge = None if resumed_from is None else self.clock.read(cfg.axis) + 1
                metrics_file, logger = open_logs(self.config, self.schedule, resumed_from, purge)
                self.live.logger = logger  # edits are logged as TensorBoard text too
            if resumed_from is None:
                eval_loss = self.evaluate()
                console.print(f"step 0/{total or '?'}  eval/loss {eval_loss:.4f}")
                if logger is not None:
                    logger.log_scalars(0, {"eval/loss": eval_loss})
            else:
                console.print(f"resumed from {resumed} at step {resumed_from}")
            while self.clock.read(unit) < budget:
                before = self.clock.read(cfg.axis)
                record, micro_steps = self.train_step()
                if self.live.changed:  # a live edit: the budget or the keys may differ
                    tags, (unit, budget) = schedule_tags(self.schedule), self.config.train.budget()
                step, x = self.step, self.clock.read(cfg.axis)
                last = self.clock.read(unit) >= budget
                stop = self.live.stop_requested

                losses: dict[str, float] = {}
                if last or _crossed(before, x, cfg.log_every):
                    train_loss = self.train_loss.take()
                    losses["train/loss"] = train_loss
                if last or _crossed(before, x, cfg.eval_every):
                    eval_loss = self.evaluate()
                    losses["eval/loss"] = eval_loss
                # TensorBoard's and Tune's: only rank 0 writes them
                scalars = {**record.scalars(tags), **losses} if rank0 else {}
                if logger is not None:
                    logger.log_scalars(x, scalars)
                if metrics_file is not None:
                    metrics_file.write(step, micro_steps, record, losses)
                headline = headline_values(record, micro_steps, losses) if losses else None
                console.update(headline)
                if headline:
                    console.log(step, headline)
                preempt = PREEMPT in self.agreed and not last  # the last step ends the run anyway
                saved = None
                if cfg.checkpoint_dir is not None and (
                    last or stop or preempt or _crossed(before, x, cfg.checkpoint_every)
                ):
                    if logger is not None:  # metrics.jsonl is flushed line by line
                        logger.flush()
                    saved = last_checkpoint = self.save_checkpoint()
                if losses and self.report is not None and rank0:
                    self.report({"global_step": float(step), **scalars}, saved)
                if preempt:
                    raise Preempted(step, saved)
                maybe_inject_fault(step, self.env.rank, cfg.checkpoint_dir)
                if stop:
                    break
            if eval_loss is None and not self.live.stop_requested:
                eval_loss = self.evaluate()
        except RuntimeError as exc:  # a collective that timed out or lost its peer, above all
            if not dist.is_initialized() or isinstance(exc, ckpt.CheckpointError):
                raise
            raise RankFailure(self.env.rank, self.step, self.timeout, exc) from exc
        finally:
            self.live.close()
            console.close()
            if metrics_file is not None:
                metrics_file.close()
            if logger is not None:
                logger.close()
        stopped = self.live.stop_requested
        return TrainResult(self.step, train_loss, eval_loss, resumed_from, last_checkpoint, stopped)


def _stop_if_diverged(lost: float, what: str, step: int) -> None:
    if lost >= _MAX_LOST_IN_A_ROW:
        raise FloatingPointError(
            f"{int(lost)} {what} at optimizer step {step + 1}; training diverged"
        )


def _crossed(before: int, now: int, every: int) -> bool:
    """An event every ``every`` units (0: never) fires at the first optimizer step at
    which the clock crosses a multiple of it."""
    return every > 0 and now // every > before // every


def train(
    config: TrainConfig,
    *,
    report: Report | None = None,
    trainer_cls: Callable[..., Trainer] | None = None,
    from_checkpoint: str | None = None,
) -> TrainResult:
    """Run the reference job described by ``config`` (see :class:`Trainer`).

    Single-process, or distributed when launched by ``torchrun`` (the process group is
    started here and destroyed at the end unless the caller had started one). Resumes
    from ``train.checkpoint_dir`` when it holds a checkpoint; ``report`` is called on
    rank 0 every ``train.log_every`` steps (see :data:`Report`). ``trainer_cls`` builds
    a :class:`Trainer` subclass instead (the Ray Tune adapter's restores differently).
    ``from_checkpoint`` starts a run without a checkpoint of its own from another run's
    (``schedany train CONFIG --from CHECKPOINT``, docs/live_control.md).

    Raises:
        ConfigError: what the config cannot be checked for before a run starts (data
            folder without documents, strategy vs launch, CUDA availability).
        CheckpointError: checkpoints exist but none is valid, or one of another kind; or
            a checkpoint could not be written (a full disk).
        Preempted, RankFailure: a preemption signal; a failed rank (docs/operations.md).
    """
    owns_group = not dist.is_initialized()
    try:
        trainer = (trainer_cls or Trainer)(config, report=report, from_checkpoint=from_checkpoint)
        with preemption_signals(trainer.flags):
            return trainer.run()
    finally:
        if owns_group:
            teardown()
