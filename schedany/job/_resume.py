"""Where a run starts: its own newest valid checkpoint, another run's (``--from``), or
nothing; and how the loaded state meets the run's config.

- A run resumed from its own checkpoint gets everything back, its live edits included:
  optimizer and schedule are rebuilt from the config those edits leave, and the edits
  its journal holds after the checkpoint are applied again at their steps
  (docs/live_control.md).
- ``--from`` (and PBT's restore into an explored config, ``rebuild_on_resume``) keep the
  model, the optimizer's state, the controller, the data position, the clock and the
  RNG, and build the schedules from this run's config at the checkpoint's clock
  (:func:`~schedany.job.rebuild.rebuild_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from . import checkpoint as ckpt
from ._trainer_parts import TrainerParts
from .distributed import is_rank0
from .rebuild import rebuild_run


def _own_checkpoint(directory: str | None) -> ckpt.CheckpointRef | None:
    """The newest valid checkpoint of ``train.checkpoint_dir``, if there is one (see
    :func:`~schedany.job.checkpoint.resumable_checkpoint`)."""
    return None if directory is None else ckpt.resumable_checkpoint(directory)


def _from_checkpoint(path: str) -> ckpt.CheckpointRef:
    """``--from``: a checkpoint folder (``step_00000040``) or a checkpoint directory (its
    newest valid checkpoint)."""
    folder = Path(path)
    for ref in ckpt.list_checkpoints(folder.parent):
        if ref.path == folder:
            return ref  # loading it checks every byte
    if not folder.is_dir():
        raise ConfigError("--from", f"{path} does not exist")
    ref = _own_checkpoint(path)
    if ref is None:
        raise ConfigError("--from", f"{path} is neither a checkpoint nor a folder holding one")
    return ref


def _load_part(part: Any, state: dict[str, Any] | None, what: str) -> None:
    """Restore the controller or the guard; the checkpoint must have one iff we do."""
    if (part is None) != (state is None):
        raise ValueError(f"it was saved with a different {what}")
    if part is not None:
        part.load_state_dict(state)


def resume(trainer: TrainerParts) -> str | None:
    """Load the run's starting checkpoint into ``trainer`` and return its path (None for a
    fresh start). Collective under torchrun: every rank calls it."""
    ref = _own_checkpoint(trainer.config.train.checkpoint_dir)
    rebuild = trainer.rebuild_on_resume
    if ref is None and trainer.from_checkpoint is not None:
        ref, rebuild = _from_checkpoint(trainer.from_checkpoint), True
    if ref is None:
        return None
    try:
        state, own = ckpt.load_checkpoint(ref, trainer.model, trainer.optimizer)
        trainer.clock.load_state_dict(state["schedule"]["clock"])
        _load_part(trainer.controller, state["controller"], "control.kind")
        _load_part(trainer.guard, state.get("guard"), "guard block")
        trainer.sampler.load_state_dict(state["data"])
        trainer.step = int(state["step"])
        if rebuild:
            # This config's schedules at the checkpoint's clock; its edits stay its own.
            rebuild_run(trainer, trainer.config)
            trainer.live.restore([], journal=False)
        else:
            edits = state.get("edits", [])
            trainer.live.restore(edits, journal=True)
            if edits:
                # The optimizer now holds every saved key (extended ones included); the
                # schedule built from the edited config then takes its saved state.
                rebuild_run(trainer, trainer.live.config(), trainer.live.cooldowns)
            trainer.schedule.load_state_dict(state["schedule"])
    except ckpt.CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ckpt.CheckpointError(
            f"checkpoint {ref.path} does not fit this config ({exc}); resume with the "
            "config that wrote it, or give train.checkpoint_dir a fresh folder"
        ) from exc
    if own is not None:
        ckpt.restore_rng_state(own["rng"])
    if is_rank0():  # one rank holds the report window's global sums
        trainer.train_loss.restore(*state.get("loss_window", (0.0, 0)))
    return str(ref.path)
