"""The reference training job: read it top to bottom.

One optimizer step = micro-batches until the controller is ready (one, without a
controller), ``optimizer.step()``, the clock advanced by the step's data, the step's
record (:class:`~schedany._record.StepRecord`), then ``schedule.step()``. Evaluation,
checkpoints, logs and ``report`` happen between optimizer steps and write that record.

Entry points: :func:`train` and ``schedany train CONFIG``. A run whose
``train.checkpoint_dir`` holds a checkpoint resumes from it exactly: model, optimizer,
schedule and clock, controller, data position and RNG state. SIGTERM or SIGUSR1 ends it
after a checkpoint of the step in progress, agreed on by every rank (docs/operations.md).
"""

from __future__ import annotations

import math
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
from ._faults import FAULT_MARKER_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV, maybe_inject_fault
from ._preemption import PREEMPT, Preempted, preemption_signals
from ._step_flags import StepFlags
from .build import build_controller, build_model, build_run
from .data import MicroBatchSampler, eval_batches, load_corpus
from .distributed import RankFailure, init_distributed, is_rank0, teardown, unwrap_model, wrap_model
from .model import loss as lm_loss

__all__ = [
    "FAULT_MARKER_ENV",
    "FAULT_RANK_ENV",
    "FAULT_STEP_ENV",
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
step), ``schedule/<key>/<group>``, ``control/<metric>`` and ``clock/<unit>``.
``checkpoint`` is the path of the checkpoint written at that step, or None."""

_MAX_DROPPED_IN_A_ROW = 20


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


class Trainer:
    """The job's state and loop. :func:`train` is the usual way in; the pieces are
    public so the overhead benchmark can time :meth:`train_step` alone."""

    def __init__(self, config: TrainConfig, *, report: Report | None = None) -> None:
        self.config = config
        self.report = report
        train_cfg = config.train
        self.timeout = timedelta(minutes=config.distributed.timeout_minutes)
        self.env = init_distributed(train_cfg.device, timeout=self.timeout)
        self.device = self.env.device
        # Requests that take effect at one step on every rank (docs/operations.md).
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
        # Train loss since the last report: the summed loss stays on the device (no sync
        # per micro-step); token counts are CPU ints already (Batch.num_tokens).
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._tokens = 0

    # --- one optimizer step ----------------------------------------------------------

    def train_step(self) -> tuple[StepRecord, int]:
        """Run micro-batches until the controller is ready, step the optimizer, record
        the values this step used, then step the schedule. Returns that record and the
        micro-batches the step took."""
        ctl, model = self.controller, self.model
        # Every batch this step drops comes before its one ready batch: drops in a row.
        dropped_before = 0.0 if ctl is None else ctl.metrics()["dropped_batches"]
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
            self._loss_sum += total.detach()
            self._tokens += n
            if ctl is None or ctl.ready:
                break
            dropped_in_a_row = int(ctl.metrics()["dropped_batches"] - dropped_before)
            if dropped_in_a_row >= _MAX_DROPPED_IN_A_ROW:
                raise FloatingPointError(
                    f"{dropped_in_a_row} logical batches in a row had non-finite "
                    f"gradients at optimizer step {self.step + 1}; training diverged"
                )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        control = None if ctl is None else ctl.metrics()
        dropped = control is not None and control["dropped_batches"] != dropped_before
        self.clock.advance(*self._global(samples, tokens, control, dropped))
        record = StepRecord.read(self.schedule, ctl, control)  # what this step used
        self.schedule.step()
        self.agreed = self.flags.agree()  # one small all-reduce under torchrun
        return record, micro_steps

    def _global(
        self, samples: int, tokens: int, control: dict[str, float] | None, dropped: bool
    ) -> tuple[int, int]:
        """This step's samples and tokens over all ranks, data of dropped batches included.

        Every rank reads ``micro_batch_size`` rows per micro-step, as many micro-steps as
        the others, so samples need no collective. A controller counting tokens has summed
        them over all ranks already (unless a batch was dropped); else one all-reduce."""
        if not dist.is_initialized():
            return samples, tokens
        if self.per_token and not dropped and control is not None:
            return samples * self.env.world_size, int(control["items"])
        counts = torch.tensor([samples, tokens], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        total_samples, total_tokens = counts.tolist()
        return total_samples, total_tokens

    # --- evaluation, losses ------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Per-token loss on the fixed held-out windows, over all ranks."""
        net = unwrap_model(self.model)  # DDP: the plain module, no collectives; FSDP: itself
        net.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.eval_set:
            total, n = lm_loss(net, batch.to(self.device), "sum")
            sums[0] += total.to(torch.float64)
            sums[1] += n
        net.train()
        if dist.is_initialized():
            dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    def loss_window(self) -> tuple[float, int]:
        """Summed per-token train loss and tokens since the last report, over all ranks."""
        window = torch.stack([self._loss_sum, self._loss_sum.new_tensor(float(self._tokens))])
        if dist.is_initialized():
            dist.all_reduce(window)
        loss_sum, tokens = window.tolist()  # one host sync
        return loss_sum, int(tokens)

    def take_train_loss(self) -> float:
        """Mean per-token train loss since the last call, over all ranks."""
        loss_sum, tokens = self.loss_window()
        self._loss_sum.zero_()
        self._tokens = 0
        return loss_sum / tokens if tokens > 0 else math.nan

    # --- checkpoints -----------------------------------------------------------------------

    def _plain_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "data": self.sampler.state_dict(),
            "loss_window": self.loss_window(),  # a resume's first report covers the same steps
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
            rank_state={"rng": ckpt.capture_rng_state()},
            keep_last=self.config.train.keep_checkpoints,
        )
        return str(ref.path)

    def resume(self) -> str | None:
        """Load the newest valid checkpoint of ``train.checkpoint_dir``, if there is one.

        Newer corrupt or truncated ones are skipped with a warning; if checkpoints exist
        but none is valid, :class:`~schedany.job.checkpoint.CheckpointError` is raised
        rather than silently starting over.
        """
        directory = self.config.train.checkpoint_dir
        ref = None if directory is None else ckpt.resumable_checkpoint(directory)
        if ref is None:
            return None
        try:
            state, own = ckpt.load_checkpoint(ref, self.model, self.optimizer)
            # The optimizer now holds every saved key (extended ones included); the
            # schedule then rewrites each scheduled key to its saved value.
            self.schedule.load_state_dict(state["schedule"])
            if (self.controller is None) != (state["controller"] is None):
                raise ValueError("it was saved with a different control.kind")
            if self.controller is not None:
                self.controller.load_state_dict(state["controller"])
            self.sampler.load_state_dict(state["data"])
        except ckpt.CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ckpt.CheckpointError(
                f"checkpoint {ref.path} does not fit this config ({exc}); resume with the "
                "config that wrote it, or give train.checkpoint_dir a fresh folder"
            ) from exc
        if own is not None:
            ckpt.restore_rng_state(own["rng"])
        loss_sum, tokens = state.get("loss_window", (0.0, 0)) if is_rank0() else (0.0, 0)
        self._loss_sum.fill_(loss_sum)  # one rank holds the window's global sums
        self._tokens = int(tokens)
        self.step = int(state["step"])
        return str(ref.path)

    # --- the whole run ----------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config.train
        resumed = self.resume()
        resumed_from = self.step if resumed else None
        rank0 = is_rank0()
        from ._console import Console, headline_values, open_logs

        tags = schedule_tags(self.schedule)  # after resume(), which may replace the schedule
        unit, budget = cfg.budget()
        total = budget if unit == "steps" else None  # the bar counts steps
        console = Console(cfg.progress, total, self.step, rank0)
        metrics_file = logger = None
        if rank0 and cfg.log_dir is not None:
            purge = None if resumed_from is None else self.clock.read(cfg.axis) + 1
            metrics_file, logger = open_logs(self.config, self.schedule, resumed_from, purge)
        train_loss = eval_loss = None
        last_checkpoint = resumed
        try:
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
                step, x = self.step, self.clock.read(cfg.axis)
                last = self.clock.read(unit) >= budget

                losses: dict[str, float] = {}
                if last or _crossed(before, x, cfg.log_every):
                    train_loss = self.take_train_loss()
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
                    last or preempt or _crossed(before, x, cfg.checkpoint_every)
                ):
                    if metrics_file is not None:
                        metrics_file.flush()
                    if logger is not None:
                        logger.flush()
                    saved = last_checkpoint = self.save_checkpoint()
                if losses and self.report is not None and rank0:
                    self.report({"global_step": float(step), **scalars}, saved)
                if preempt:
                    raise Preempted(step, saved)
                maybe_inject_fault(step, self.env.rank, cfg.checkpoint_dir)
            if eval_loss is None:
                eval_loss = self.evaluate()
        except RuntimeError as exc:  # a collective that timed out or lost its peer, above all
            if not dist.is_initialized() or isinstance(exc, ckpt.CheckpointError):
                raise
            raise RankFailure(self.env.rank, self.step, self.timeout, exc) from exc
        finally:
            console.close()
            if metrics_file is not None:
                metrics_file.close()
            if logger is not None:
                logger.close()
        return TrainResult(self.step, train_loss, eval_loss, resumed_from, last_checkpoint)


def _crossed(before: int, now: int, every: int) -> bool:
    """An event every ``every`` units (0: never) fires at the first optimizer step at
    which the clock crosses a multiple of it."""
    return every > 0 and now // every > before // every


def train(
    config: TrainConfig,
    *,
    report: Report | None = None,
    trainer_cls: Callable[..., Trainer] | None = None,
) -> TrainResult:
    """Run the reference job described by ``config`` (see :class:`Trainer`).

    Single-process, or distributed when launched by ``torchrun`` (the process group is
    started here and destroyed at the end unless the caller had started one). Resumes
    from ``train.checkpoint_dir`` when it holds a checkpoint; ``report`` is called on
    rank 0 every ``train.log_every`` steps (see :data:`Report`). ``trainer_cls`` builds
    a :class:`Trainer` subclass instead (the Ray Tune adapter's restores differently).

    Raises:
        ConfigError: what the config cannot be checked for before a run starts (data
            folder without documents, strategy vs launch, CUDA availability).
        CheckpointError: checkpoints exist but none is valid, or one of another kind; or
            a checkpoint could not be written (a full disk).
        Preempted, RankFailure: a preemption signal; a failed rank (docs/operations.md).
    """
    owns_group = not dist.is_initialized()
    try:
        trainer = (trainer_cls or Trainer)(config, report=report)
        with preemption_signals(trainer.flags):
            return trainer.run()
    finally:
        if owns_group:
            teardown()
