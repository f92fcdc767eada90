"""What runs inside one trial: the reference job, reporting to Tune every
``train.log_every`` optimizer steps with a checkpoint of the same step, restoring from
Tune's checkpoint, and rebuilding the schedule when the config changed (PBT).

Imported on Ray workers only; ray is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..job.build import build_controller, build_run
from ..job.distributed import is_rank0
from ..job.trainer import Report, Trainer, TrainResult, train
from ._sweep import resolve_trial_config
from ._tune_restore import rebuild_at_step

__all__ = ["TrialSettings", "job_folder", "run_trial", "stage_restore", "trial_config"]

VALUES_FILE = "trial_values.json"
"""Written into every Tune checkpoint: the trial's sampled values, so a restore can
tell whether its config changed since (PBT) and the schedule must be rebuilt."""
LOG_SUBDIR = "logs"
"""Per-trial TensorBoard event files, ``metrics.jsonl`` and ``config.yaml``."""
JOB_CHECKPOINT_SUBDIR = "job_checkpoints"


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
    config: TrainConfig, trial_dir: str | os.PathLike[str], metric: str,
    job_dir: str | os.PathLike[str] | None = None,
) -> TrainConfig:
    """``config`` with the trial's own log folder, job checkpoints in ``job_dir``
    (default: inside ``trial_dir``), a checkpoint at every report, an evaluation at
    every report when the metric is ``eval/loss``, and no progress bar."""
    t = config.train
    train = dataclasses.replace(
        t,
        log_dir=os.path.join(trial_dir, LOG_SUBDIR),
        checkpoint_dir=os.fspath(job_dir or os.path.join(trial_dir, JOB_CHECKPOINT_SUBDIR)),
        checkpoint_every=t.log_every,
        eval_every=t.log_every if metric == "eval/loss" else t.eval_every,
        progress="none",
    )
    return dataclasses.replace(config, train=train)


class TuneTrainer(Trainer):
    """The reference :class:`~schedany.job.trainer.Trainer`, whose restore rebuilds the
    schedule from this trial's config when ``rebuild_schedule`` is set (see
    :func:`~schedany.integrations._tune_restore.rebuild_at_step`); ``on_checkpoint``
    runs on every rank right after each checkpoint (multi-worker trials report there)."""

    def __init__(self, config: TrainConfig, *, report: Report | None, rebuild_schedule: bool,
                 on_checkpoint: Any = None) -> None:
        super().__init__(config, report=report)
        self.rebuild_schedule = rebuild_schedule
        self.on_checkpoint = on_checkpoint

    def resume(self) -> str | None:
        path = super().resume()
        if path is None or not self.rebuild_schedule:
            return path
        # super() loaded the donor's optimizer (with its hyperparameters) and schedule;
        # keep the optimizer's state and rebuild the rest from this trial's config.
        optimizer, schedule = build_run(self.config, self.model)
        rebuild_at_step(optimizer, schedule, self.optimizer.state_dict(), self.step)
        controller = build_controller(self.config, self.model, optimizer)
        if controller is not None:
            controller.load_state_dict(self.controller.state_dict())
        self.optimizer, self.schedule, self.controller = optimizer, schedule, controller
        return path

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

    def __init__(self, values: Mapping[str, Any], staging: Path) -> None:
        self.values = dict(values)
        self.staging = staging

    def __call__(self, metrics: dict[str, float], checkpoint_path: str | None) -> None:
        from ray import tune

        metrics = {**metrics, "global_step": int(metrics["global_step"])}
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
    saved = stage_restore(tune.get_checkpoint(), job_dir)
    with tempfile.TemporaryDirectory(prefix="staging-", dir=job_dir) as staging:
        _run(
            config,
            report=_Reporter(values, Path(staging)),
            rebuild_schedule=saved is not None and saved != values,
        )
    shutil.rmtree(job_dir, ignore_errors=True)  # done: Tune holds the checkpoints


# --- multi-worker trials (Ray Train TorchTrainer) -------------------------------------


def _run_ddp_trial(values: dict[str, Any], settings: TrialSettings) -> None:
    """One trial as a DDP job: a ``TorchTrainer`` of ``settings.workers`` processes.

    Job checkpoints live in the experiment folder (a filesystem every worker sees) and
    crashed workers are restarted by Ray Train (``max_failures``) from them; metrics
    reach Tune through ``TuneReportCallback``.
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    local_trial_dir = Path(context.get_trial_dir())
    # The trial's own folder in the experiment, where Tune writes its results too.
    trial_dir = Path(settings.storage_dir) / local_trial_dir.name if settings.storage_dir \
        else local_trial_dir
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"values": values, "settings": settings, "trial_dir": str(trial_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker={"CPU": settings.cpus_per_worker,
                                  **({"GPU": settings.gpus_per_worker}
                                     if settings.gpus_per_worker else {})},
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

    def report(metrics: dict[str, float], checkpoint_path: str | None) -> None:
        ray.train.report({**metrics, "global_step": int(metrics["global_step"])})

    def others_report(path: str) -> None:
        # ray.train.report is a barrier over all workers; the trainer reports on rank 0
        # only, so the other ranks report (nothing) once per checkpoint, i.e. per report.
        if not is_rank0():
            ray.train.report({})

    _run(config, report=report, rebuild_schedule=False, on_checkpoint=others_report)
