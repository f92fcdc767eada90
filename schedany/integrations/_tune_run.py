"""What runs inside a trial: the reference job (:func:`run_trial`) or your own function
(:func:`report`, :func:`restore`), reporting to Tune with checkpoints and restoring
from them (docs/tuning.md, "What a trial does" and "Your own training function").

After a PBT exploit both restores load the donor's checkpoint through
:func:`~schedany.job.rebuild.rebuild_at_step` (the reference job's through
:func:`~schedany.job.rebuild.rebuild_run`, as ``schedany train --from`` does). Ray is
imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .._clock import UNITS
from .._record import StepRecord, schedule_tags
from .._synchronous import SynchronousSchedule
from ..config import TrainConfig, TrainSection
from ..job.distributed import is_rank0
from ..job.rebuild import rebuild_at_step
from ..job.trainer import Report, Trainer, TrainResult, train
from ._tune_space import resolve_trial_config

VALUES_FILE = "trial_values.json"
"""Written into every Tune checkpoint of :func:`run_trial`: the trial's sampled values,
so a restore can tell whether its config changed since (PBT)."""
LOG_SUBDIR = "logs"
"""Per-trial TensorBoard event files, ``metrics.jsonl`` and ``config.yaml``."""
JOB_CHECKPOINT_SUBDIR = "job_checkpoints"
LOSSES = ("eval/loss", "train/loss")
"""The scalars every trial's TensorBoard run holds, and a sweep's metric is one of."""

# --- the reference job as a trial ------------------------------------------------------


@dataclass(frozen=True)
class TrialSettings:
    """What every trial needs besides its sampled values (shipped once per sweep)."""

    base: dict[str, Any]
    metric: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0
    storage_dir: str | None = None
    """The experiment folder; multi-worker trials keep their job checkpoints there."""


def trial_config(
    config: TrainConfig,
    trial_dir: str | os.PathLike[str],
    metric: str,
    job_dir: str | os.PathLike[str] | None = None,
) -> TrainConfig:
    """``config`` with the trial's own log folder, job checkpoints in ``job_dir``
    (default: inside ``trial_dir``), a checkpoint at every report, an evaluation at
    every report when the metric is ``eval/loss``, and no progress bar."""
    t = config.train
    train_section = dataclasses.replace(
        t,
        log_dir=os.path.join(trial_dir, LOG_SUBDIR),
        checkpoint_dir=os.fspath(job_dir or os.path.join(trial_dir, JOB_CHECKPOINT_SUBDIR)),
        checkpoint_every=t.log_every,
        eval_every=t.log_every if metric == "eval/loss" else t.eval_every,
        progress="none",
    )
    return dataclasses.replace(config, train=train_section)


def report_key(unit: str) -> str:
    """``report/<unit>``: in every report of :func:`run_trial`, the multiple of
    ``train.log_every`` (in ``train.axis`` units) the report is for."""
    return f"report/{unit}"


def tune_metrics(metrics: Mapping[str, float], train: TrainSection) -> dict[str, Any]:
    """A trial's report: the job's ``metrics`` with ``global_step`` and ``clock/*`` as
    integers, and :func:`report_key` of ``train.axis``. A report comes at the first
    step whose clock crosses a multiple of ``log_every``; the multiple it crossed is
    what Tune's schedulers count (the last report, at the budget, may cross none)."""
    out: dict[str, Any] = dict(metrics)
    for key in ("global_step", *(f"clock/{unit}" for unit in UNITS)):
        if key in out:
            out[key] = int(out[key])
    reading = out[f"clock/{train.axis}"]
    out[report_key(train.axis)] = reading - reading % train.log_every
    return out


def write_trial_hparams(config: TrainConfig, values: Mapping[str, Any], metric: str) -> None:
    """The trial's TensorBoard run (the job's, in ``train.log_dir``) gets the trial's
    searched values as HParams, and the job's losses, the sweep's metric first, as the
    metrics the HParams tab compares (each at its last value). Rank 0 writes it."""
    from .tensorboard import write_hparams

    assert config.train.log_dir is not None  # trial_config set it
    write_hparams(config.train.log_dir, values, list(dict.fromkeys([metric, *LOSSES])))


class TuneTrainer(Trainer):
    """The reference :class:`~schedany.job.trainer.Trainer`, restoring through
    :func:`~schedany.job.rebuild.rebuild_run` when ``rebuild_schedule`` is set (the
    trial's values changed since the checkpoint: a PBT exploit), the mechanism of
    ``schedany train --from``. ``on_checkpoint`` runs on every rank right after each
    checkpoint (multi-worker trials report there)."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        report: Report | None,
        rebuild_schedule: bool,
        on_checkpoint: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, report=report, **kwargs)
        # The donor's model, optimizer state, data position and clock; this config's
        # schedules at that clock.
        self.rebuild_on_resume = rebuild_schedule
        self.on_checkpoint = on_checkpoint

    def save_checkpoint(self) -> str:
        path = super().save_checkpoint()
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        return path


def _run(config: TrainConfig, *, report: Report | None, **trainer_args: Any) -> TrainResult:
    """:func:`schedany.job.trainer.train` with a :class:`TuneTrainer`."""
    return train(config, report=report, trainer_cls=functools.partial(TuneTrainer, **trainer_args))


def _link_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoints are never rewritten in place, so a link is safe
    except OSError:
        shutil.copy2(src, dst)


def job_folder(experiment: str, trial_id: str) -> Path:
    """Where a single-worker trial keeps its job checkpoints on its node."""
    return Path(tempfile.gettempdir()) / "schedany-tune" / f"{experiment}-{trial_id}"


def stage_restore(checkpoint: Any, job_dir: Path) -> dict[str, Any] | None:
    """Put a Tune checkpoint's job files into ``job_dir`` (replacing any there) and
    return the values saved with it; ``None`` (and an empty ``job_dir``) without one.
    Other files in ``job_dir`` (the fault-injection marker) are kept."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for entry in job_dir.iterdir():
        if entry.name.startswith("step_"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        for entry in Path(folder).iterdir():
            if entry.name.startswith("step_"):
                shutil.copytree(entry, job_dir / entry.name, copy_function=_link_file)
        return json.loads((Path(folder) / VALUES_FILE).read_text())


class _Reporter:
    """The trainer's ``report``: each call becomes one ``tune.report`` whose checkpoint
    is the job checkpoint written at the same step (plus the trial's values)."""

    def __init__(self, values: Mapping[str, Any], staging: Path, train: TrainSection) -> None:
        self.values = dict(values)
        self.staging = staging
        self.train = train

    def __call__(self, metrics: dict[str, float], checkpoint_path: str | None) -> None:
        from ray import tune

        metrics = tune_metrics(metrics, self.train)
        if checkpoint_path is None:
            tune.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(dir=self.staging))
        try:
            src = Path(checkpoint_path)  # one job checkpoint: the folder step_N/
            shutil.copytree(src, folder / src.name, copy_function=_link_file)
            (folder / VALUES_FILE).write_text(json.dumps(self.values))
            # tune.report persists the folder to the storage path before it returns,
            # so the job's own copy is no longer needed (and is not synced twice).
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            shutil.rmtree(src, ignore_errors=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def run_trial(values: dict[str, Any], *, settings: TrialSettings) -> None:
    """The Tune function trainable: one trial of the reference job."""
    from ray import tune

    if settings.workers > 1:
        _run_ddp_trial(values, settings)
        return
    config = resolve_trial_config(settings.base, values)
    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    # The job's own checkpoints are a step on the way to Tune's, so they stay out of the
    # trial folder (which Tune syncs); on this node they outlive a crash of the trial.
    job_dir = job_folder(context.get_experiment_name(), context.get_trial_id())
    config = trial_config(config, trial_dir, settings.metric, job_dir)
    write_trial_hparams(config, values, settings.metric)
    saved = stage_restore(tune.get_checkpoint(), job_dir)
    with tempfile.TemporaryDirectory(prefix="staging-", dir=job_dir) as staging:
        _run(
            config,
            report=_Reporter(values, Path(staging), config.train),
            # A restart after a crash has the same values and resumes as `schedany train`.
            rebuild_schedule=saved is not None and saved != values,
        )
    shutil.rmtree(job_dir, ignore_errors=True)  # done: Tune holds the checkpoints


def _run_ddp_trial(values: dict[str, Any], settings: TrialSettings) -> None:
    """One trial as a DDP job: a ``TorchTrainer`` of ``settings.workers`` processes.

    Job checkpoints live in the experiment folder (a filesystem every worker sees) and
    crashed workers are restarted by Ray Train (``max_failures``) from them; metrics
    reach Tune through ``TuneReportCallback``. PBT is refused for these trials, so they
    never restore into an explored config.
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    local_trial_dir = Path(tune.get_context().get_trial_dir())
    # The trial's own folder in the experiment, where Tune writes its results too.
    trial_dir = local_trial_dir
    if settings.storage_dir:
        trial_dir = Path(settings.storage_dir) / local_trial_dir.name
    gpus = {"GPU": settings.gpus_per_worker} if settings.gpus_per_worker else {}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"values": values, "settings": settings, "trial_dir": str(trial_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker={"CPU": settings.cpus_per_worker, **gpus},
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=str(trial_dir),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _ddp_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker; Ray Train has started the process group."""
    import ray.train

    settings: TrialSettings = loop_config["settings"]
    config = resolve_trial_config(settings.base, loop_config["values"])
    config = trial_config(config, loop_config["trial_dir"], settings.metric)
    write_trial_hparams(config, loop_config["values"], settings.metric)

    def report(metrics: dict[str, float], checkpoint_path: str | None) -> None:
        ray.train.report(tune_metrics(metrics, config.train))

    def others_report(path: str) -> None:
        # ray.train.report is a barrier over all workers; the trainer reports on rank 0
        # only, so the other ranks report (nothing) once per checkpoint, i.e. per report.
        if not is_rank0():
            ray.train.report({})

    _run(config, report=report, rebuild_schedule=False, on_checkpoint=others_report)


# --- your own function trainable -------------------------------------------------------


def schedule_metrics(schedule: SynchronousSchedule, controller: Any = None) -> dict[str, float]:
    """``schedule/<key>/<group>`` for every scheduled key and param group, and
    ``control/<metric>`` for a controller: the names TensorBoard shows
    (docs/inspecting_schedules.md). Two groups with the same label are a ``ValueError``,
    as in :class:`~schedany.integrations.tensorboard.ScheduleLogger`."""
    return StepRecord.read(schedule, controller).scalars(schedule_tags(schedule))


def report(
    step: int,
    schedule: SynchronousSchedule,
    metrics: Mapping[str, float] | None = None,
    *,
    model: nn.Module | None = None,
    optimizer: Optimizer | None = None,
    controller: Any = None,
) -> None:
    """``tune.report`` of ``global_step``, the scheduled values and ``metrics``, from
    your own function trainable; call it after ``optimizer.step()`` and before
    ``schedule.step()``, so the values are the ones that step used.

    With ``model`` and ``optimizer`` it also reports a checkpoint (model, optimizer,
    schedule, controller, step) that :func:`restore` reads back.
    """
    from ray import tune

    from ..job.checkpoint import save_checkpoint

    values = {"global_step": int(step), **schedule_metrics(schedule, controller), **(metrics or {})}
    if model is None or optimizer is None:
        tune.report(values)
        return
    state = {
        "step": int(step),
        "schedule": schedule.state_dict(),
        "controller": None if controller is None else controller.state_dict(),
    }
    folder = Path(tempfile.mkdtemp(prefix="schedany-tune-"))
    try:
        save_checkpoint(folder, int(step), model, optimizer, state, keep_last=1)
        tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restore(
    *,
    model: nn.Module,
    optimizer: Optimizer,
    schedule: SynchronousSchedule,
    controller: Any = None,
) -> int:
    """Load this trial's Tune checkpoint (a PBT donor's, after an exploit) and return
    its step; 0 without one.

    ``optimizer`` and ``schedule`` must be freshly built from the trial's *current*
    config: the schedule is positioned at the restored step on its own curve, and the
    optimizer keeps the checkpoint's state but the current config's hyperparameters
    (docs/tuning.md, "Population Based Training"): after a PBT exploit, the explored
    values win over the donor's.
    """
    from ray import tune

    from ..job.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    # The checkpoint brings back the donor's hyperparameters with its optimizer state;
    # this trial's own values are put back first, for rebuild_at_step to start from.
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    with checkpoint.as_directory() as folder:
        ref = latest_valid_checkpoint(folder)
        if ref is None:
            raise CheckpointError(f"Tune checkpoint {folder} holds no valid schedany checkpoint")
        state, _ = load_checkpoint(ref, model, optimizer)
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    step = int(state["step"])
    rebuild_at_step(
        optimizer,
        schedule,
        optimizer.state_dict(),
        step,
        controller=controller,
        controller_state=state["controller"],
    )
    return step
