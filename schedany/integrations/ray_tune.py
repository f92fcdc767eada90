"""Ray Tune adapter: sweep schedule hyperparameters of the reference job, or of your own
training function, with grid/random search, ASHA or Population Based Training
(docs/tuning.md).

- :func:`tune_command` is ``schedany tune SWEEP [--address ADDR] [--num-samples N]``.
- :func:`load_sweep` checks a sweep file; :func:`run_sweep` runs it and returns Tune's
  ``ResultGrid``.
- :func:`build_search_space` turns ``{dotted path: {kind: args}}`` into a Tune
  ``param_space``.
- :func:`report` / :func:`restore` are for your own function trainable: they report
  ``global_step``, every scheduled value and a checkpoint, and restore with the schedule
  rebuilt from the trial's current config (what PBT needs).

This module is the driver: the Tuner and trial scheduler, and the closing summary.
Where a sweep runs (:func:`ray_session`) is ``_ray_session``; the sweep file is checked
in ``_sweep``; the search space and PBT's explore and restore live in ``_tune_space``;
what runs inside a trial (ours, or your :func:`report` / :func:`restore`) in
``_tune_run``. Each trial is one TensorBoard run, the job's, with its searched values
as HParams (docs/integrations.md, "Ray Tune and TensorBoard's HParams").

Targets the current Tune API (``tune.Tuner``, ``tune.report``, ``tune.get_checkpoint``,
``tune.RunConfig``). Ray is imported inside the functions that need it, so importing
this module is cheap, and ``import schedany`` never imports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, config_to_dict
from ._ray_session import ClusterError, Connection, parse_address, ray_session  # noqa: F401
from ._sweep import ResourcesSection, Sweep, TuneSection, load_sweep
from ._tune_run import (
    LOG_SUBDIR,
    TrialSettings,
    job_folder,
    report,
    report_key,
    restore,
    run_trial,
    schedule_metrics,
)
from ._tune_space import Distribution, LegalExplore, parse_search, resolve_trial_config

__all__ = [
    "ClusterError",
    "Distribution",
    "LegalExplore",
    "Sweep",
    "TrialSettings",
    "build_search_space",
    "load_sweep",
    "make_tuner",
    "report",
    "restore",
    "run_sweep",
    "run_trial",
    "schedule_metrics",
    "tune_command",
    "without_tune_tensorboard",
]


# --- the Tuner --------------------------------------------------------------------------


def scheduler_time_attr(sweep: Sweep) -> str:
    """The report key ASHA and PBT count ``tune.time_attr`` in: a clock reading as
    ``report/<unit>``, the multiple of ``train.log_every`` the report is for. A step's
    samples or tokens vary, so the reading lands a little past that multiple, and PBT,
    which compares differences of readings with its interval, would skip reports."""
    if sweep.tune.time_attr == "global_step":
        return "global_step"
    return report_key(sweep.time_unit)


def make_scheduler(sweep: Sweep) -> Any:
    """The Ray Tune trial scheduler of ``tune.scheduler`` (``None`` for ``none``)."""
    t = sweep.tune
    if t.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if t.scheduler == "asha":
        # load_sweep filled in the defaults, in the unit of tune.time_attr.
        assert t.asha.max_t is not None and t.asha.grace_period is not None
        return ASHAScheduler(
            time_attr=scheduler_time_attr(sweep),
            max_t=t.asha.max_t,
            grace_period=t.asha.grace_period,
            reduction_factor=t.asha.reduction_factor,
            brackets=t.asha.brackets,
        )
    pbt = t.pbt
    assert pbt.perturbation_interval is not None  # load_sweep checked it
    return PopulationBasedTraining(
        time_attr=scheduler_time_attr(sweep),
        perturbation_interval=pbt.perturbation_interval,
        burn_in_period=pbt.burn_in_period,
        hyperparam_mutations={p: d.to_mutation() for p, d in sweep.mutations.items()},
        quantile_fraction=pbt.quantile_fraction,
        resample_probability=pbt.resample_probability,
        perturbation_factors=tuple(pbt.perturbation_factors),
        custom_explore_fn=LegalExplore(sweep.base, sweep.mutations),
        synch=pbt.synch,
    )


def build_search_space(search: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune ``param_space`` from ``{dotted config path: {kind: args}}``.

    Kinds: ``uniform`` / ``loguniform`` ``[low, high]``, ``randint`` ``[low, high]``
    (both ends included), ``choice`` / ``grid`` ``[values...]``. Keys stay dotted
    (``"schedules.lr.num_warmup_steps"``); a trial writes them into its config.

    >>> space = build_search_space({"schedules.lr.num_warmup_steps": {"grid": [0, 10]}})
    >>> space["schedules.lr.num_warmup_steps"]
    {'grid_search': [0, 10]}
    """
    return {path: dist.to_tune() for path, dist in parse_search(search).items()}


DRIVER_CPUS = 0.01
"""What a multi-worker trial itself holds: it only drives a TorchTrainer, whose workers
hold the real resources (Tune needs a non-empty request)."""


def _trial_resources(r: ResourcesSection) -> dict[str, float]:
    if r.workers > 1:
        return {"cpu": DRIVER_CPUS}
    return {"cpu": r.cpus, "gpu": r.gpus}


def _check_fits(r: ResourcesSection, connection: Connection) -> None:
    """A trial bigger than a local Ray would wait forever; say so instead."""
    need = r.workers * r.cpus + (DRIVER_CPUS if r.workers > 1 else 0.0)
    if connection.mode == "local" and need > connection.num_cpus:
        raise ConfigError(
            "tune.resources",
            f"one trial needs {need:g} CPUs ({r.workers} worker(s) x {r.cpus:g}"
            f"{' + the trial driver' if r.workers > 1 else ''}), but the local Ray has "
            f"{connection.num_cpus:g}; lower tune.resources or pass --address of a bigger cluster",
        )


def _keep(t: TuneSection) -> int | None:
    if t.keep_checkpoints is not None:
        return t.keep_checkpoints
    return None if t.scheduler == "pbt" else 2


def _storage_root(storage_path: str) -> str:
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def make_tuner(sweep: Sweep, connection: Connection, *, verbose: int = 1) -> Any:
    """The ``tune.Tuner`` of ``sweep``, on the Ray this process is connected to; fit it
    in :func:`without_tune_tensorboard`, as :func:`run_sweep` does."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = sweep.tune
    _check_fits(t.resources, connection)
    storage = _storage_root(t.storage_path)
    settings = TrialSettings(
        base=sweep.base,
        metric=t.metric,
        workers=t.resources.workers,
        cpus_per_worker=t.resources.cpus,
        gpus_per_worker=t.resources.gpus,
        max_failures=t.max_failures,
        storage_dir=None if "://" in storage else os.path.join(storage, sweep.name),
    )
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    trainable = tune.with_parameters(run_trial, settings=settings)
    trainable = tune.with_resources(trainable, _trial_resources(t.resources))
    return tune.Tuner(
        trainable,
        param_space={p: d.to_tune() for p, d in sweep.search.items()},
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            scheduler=make_scheduler(sweep),
            # The variant generator takes the limit itself: Tune ignores
            # max_concurrent_trials next to a search_alg that is not a Searcher.
            search_alg=BasicVariantGenerator(
                random_state=t.seed, max_concurrent=t.max_concurrent_trials or 0
            ),
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage,
            # Multi-worker trials are restarted by Ray Train, inside the trial.
            failure_config=tune.FailureConfig(
                max_failures=t.max_failures if t.resources.workers == 1 else 0
            ),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=_keep(t)),
            # Tune's result files, without its TensorBoard logger: each trial's run is
            # the job's (see without_tune_tensorboard).
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
            verbose=verbose,
        ),
    )


_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


@contextlib.contextmanager
def without_tune_tensorboard() -> Iterator[None]:
    """Fit a Tuner of :func:`make_tuner` in this block: Tune adds a TensorBoard logger of
    its own to a run that passes none, and each trial would show twice, its Tune results
    beside the job's run (``<trial>/logs``, the scalars and the HParams). Tune reads
    this documented switch when ``fit()`` starts; it is put back at the end."""
    saved = os.environ.get(_AUTO_LOGGERS)
    os.environ[_AUTO_LOGGERS] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[_AUTO_LOGGERS]
        else:
            os.environ[_AUTO_LOGGERS] = saved


def run_sweep(
    sweep: Sweep, address: str | None = None, *, verbose: int = 1
) -> tuple[Any, Connection]:
    """Run ``sweep`` and return ``(ResultGrid, Connection)``.

    ``address=None`` (and no ``RAY_ADDRESS``): an embedded local Ray, stopped at the end.
    ``"auto"`` / ``"host:port"``: an existing cluster; nothing is started or stopped.
    """
    # The job's fault injection (tests of max_failures) reaches the trials on a cluster too.
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("SCHEDANY_FAULT_")}
    with ray_session(address, env_vars=forwarded) as connection, without_tune_tensorboard():
        results = make_tuner(sweep, connection, verbose=verbose).fit()
    if connection.mode == "local":
        # Trials stopped early (ASHA) or failed leave their job folders on this node.
        for result in results:
            trial_id = (result.metrics or {}).get("trial_id")
            if trial_id:
                shutil.rmtree(job_folder(sweep.name, trial_id), ignore_errors=True)
    return results, connection


def _summary(sweep: Sweep, results: Any, connection: Connection) -> tuple[list[str], bool]:
    t = sweep.tune
    experiment = Path(results.experiment_path)
    lines = [f"ran {len(results)} trial(s) on {connection.mode} Ray ({connection.address})"]
    failed = [r for r in results if r.error is not None]
    for r in failed:
        first = str(r.error).strip().splitlines()
        lines.append(f"trial {Path(r.path).name} failed: {first[-1] if first else r.error!r}")
    try:
        best = results.get_best_result(metric=t.metric, mode=t.mode, scope="last")
    except RuntimeError:
        best = None
    if best is None or best.metrics is None or t.metric not in best.metrics:
        lines.append(f"no trial reported {t.metric}")
        return lines, False
    values = {k: best.config[k] for k in sweep.search if k in best.config}
    values.update({k: v for k, v in best.config.items() if k not in values})
    at = f"at step {best.metrics.get('global_step')}"
    if t.time_attr != "global_step":
        at += f" ({t.time_attr} {best.metrics.get(t.time_attr)})"
    lines.append(
        f"best trial: {Path(best.path).name}  {t.metric} {best.metrics[t.metric]:.6g} {at}"
    )
    lines.append("best config:")
    lines += [f"  {k}: {v!r}" for k, v in values.items()]
    if "://" not in str(experiment):
        best_yaml = experiment / "best_config.yaml"
        config = resolve_trial_config(sweep.base, values)
        best_yaml.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        lines.append(f"best train config: {best_yaml}  (schedany train {best_yaml})")
    lines.append(f"results: {experiment}")
    if best.checkpoint is not None:
        lines.append(f"best checkpoint: {best.checkpoint.path}")
    lines.append(
        f"tensorboard: tensorboard --logdir {experiment}  (one run per trial, "
        f"<trial>/{LOG_SUBDIR}; the HParams tab compares them)"
    )
    return lines, not failed


def tune_command(sweep_path: str, address: str | None, num_samples: int | None) -> int:
    """``schedany tune``: check the sweep file, run it, print the best config and where
    the results and per-trial TensorBoard logs are.

    Returns 0 on success, 1 when the cluster cannot be reached or a trial failed.
    Raises :class:`~schedany.config.ConfigError` for a bad sweep file or argument (the
    CLI turns it into exit code 2), before Ray is started.
    """
    sweep = load_sweep(sweep_path, num_samples)
    try:
        results, connection = run_sweep(sweep, address)
    except ClusterError as exc:
        print(f"schedany tune: error: {exc}", file=sys.stderr, flush=True)
        return 1
    lines, ok = _summary(sweep, results, connection)
    print("\n".join(lines), flush=True)
    return 0 if ok else 1
