"""The train config, block by block: what each field means and what it accepts.

A YAML train config maps one to one onto :class:`TrainConfig`. Two blocks are written
inline rather than field by field: ``optimizer`` (``name`` plus the optimizer's own
keyword arguments) and each entry of ``schedules`` (``curve`` or ``scheduler`` plus
its arguments); see :class:`OptimizerSection` and :class:`ScheduleSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .._clock import UNITS, Unit
from .parsing import ConfigError, check_int, expected


def _min(n: float) -> Any:
    return {"min": n}


@dataclass(frozen=True)
class ModelSection:
    """Shape of the byte-level transformer LM (vocabulary: the 256 byte values).

    The one description of the model's shape: the job's model is built from it. Built
    from Python rather than a file, it checks its own fields (``ValueError``).
    """

    d_model: int = field(default=64, metadata=_min(1))
    """Width of the residual stream."""
    n_layers: int = field(default=2, metadata=_min(1))
    """Number of transformer blocks."""
    n_heads: int = field(default=4, metadata=_min(1))
    """Attention heads per block; must divide ``d_model``."""
    seq_len: int = field(default=128, metadata=_min(2))
    """Context length in bytes; training chunks and eval windows are at most this long."""
    mlp_ratio: int = field(default=4, metadata=_min(1))
    """Hidden width of each MLP as a multiple of ``d_model``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_int(getattr(self, f.name), f"model.{f.name}", min=f.metadata["min"])
        if self.d_model % self.n_heads:
            raise expected(
                "model.n_heads", f"a divisor of model.d_model ({self.d_model})", self.n_heads
            )


@dataclass
class DataSection:
    """The text corpus: every file under a folder, split by document into train and eval."""

    path: str | None = None
    """Folder of text files; ``null`` means the Python standard library's ``.py`` files."""
    suffixes: list[str] | None = None
    """File endings to keep (``[".py", ".md"]``); ``null`` keeps every file of ``path``
    (``.py`` for the standard library)."""
    max_bytes: int = field(default=2 * 2**20, metadata=_min(2))
    """Cap on the corpus size: files are read in path order until this many bytes."""
    eval_fraction: float = field(default=0.1, metadata={"gt": 0.0, "lt": 1.0})
    """Fraction of documents held out for evaluation (in (0, 1))."""
    eval_windows: int = field(default=64, metadata=_min(1))
    """Number of fixed held-out windows of ``model.seq_len`` bytes the eval loss averages over."""
    eval_batch_size: int = field(default=16, metadata=_min(1))
    """Rows per evaluation forward pass."""
    min_len: int | None = field(default=None, metadata=_min(1))
    """Shortest training chunk in target bytes; ``null`` means ``model.seq_len // 8``."""


@dataclass
class OptimizerSection:
    """``optimizer:`` — a ``torch.optim`` class by name and its keyword arguments, inline.

    .. code-block:: yaml

        optimizer:
          name: AdamW
          lr: 1.0e-3
          weight_decay: 0.1
          betas: [0.9, 0.95]          # lists become tuples
          param_groups:               # optional: named groups decay / no_decay
            no_decay: {weight_decay: 0.0}
    """

    name: str = "AdamW"
    """A class of ``torch.optim`` (``SGD``, ``Adam``, ``AdamW``, ...)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The optimizer's keyword arguments (every key of the block except ``name`` and
    ``param_groups``); checked against the class's signature."""
    param_groups: dict[str, dict[str, Any]] | None = None
    """``null``: one param group. A mapping (possibly empty): two named groups, ``decay``
    (weight matrices) and ``no_decay`` (biases, norms, embeddings; ``weight_decay`` 0
    unless given), each with its own overrides of ``kwargs``. Group names appear in
    TensorBoard tags (``schedule/weight_decay/decay``)."""


@dataclass
class ScheduleSpec:
    """One entry of ``schedules:`` — the target key maps to a curve or a torch scheduler.

    .. code-block:: yaml

        lr: {curve: cosine_annealing_with_warmup, warmup_to_value: 1.0, ..., unit: tokens}
        weight_decay: {scheduler: StepLR, step_size: 30, gamma: 0.5, unit: samples, every: 512}
    """

    target: str
    """The optimizer key it drives: ``lr``, ``weight_decay``, ``betas[0]``, an extended key."""
    kind: Literal["curve", "scheduler"]
    """``curve``: a built-in (docs/api.md) or registered curve; ``scheduler``: a class of
    ``torch.optim.lr_scheduler``."""
    name: str
    """The curve's or the scheduler class's name."""
    args: dict[str, Any] = field(default_factory=dict)
    """Its keyword arguments (without the optimizer and the target)."""
    unit: Unit = "steps"
    """What the schedule's ``t`` counts: optimizer steps, samples or tokens (docs/clock.md)."""
    every: int = 1
    """``scheduler:`` entries: the torch scheduler takes one ``step()`` per ``every`` units."""


@dataclass
class ControlSection:
    """``control:`` — the reactive control loop that decides when the optimizer steps."""

    kind: Literal["none", "logical_batch", "gnts"] = "none"
    """``none``: one micro-batch per rank per optimizer step. ``logical_batch``: accumulate
    until the scheduled logical batch size is reached. ``gnts``: accumulate
    until the mean gradient's norm is under the scheduled threshold."""
    key: str | None = None
    """Optimizer key holding the control target; ``null`` means ``logical_batch_size``
    (logical_batch) or ``gradient_norm_threshold`` (gnts). It must be an optimizer
    argument or declared in ``extend``."""
    items: Literal["tokens", "samples"] = "tokens"
    """What an item is: ``tokens`` (the loss is summed over tokens and gradients are
    per-token means over the whole logical batch) or ``samples`` (the loss is a
    per-micro-batch mean; a logical batch size then counts rows)."""
    max_accumulation_steps: int | None = field(default=None, metadata=_min(1))
    """gnts only: step anyway after this many micro-steps (``null``: no limit)."""
    noise_scale: bool = False
    """Also measure the gradient noise scale ``tr(Σ)/‖G‖²`` at each optimizer step, in
    items (``control/noise_scale``; docs/control_loops.md). Needs a controller."""
    noise_scale_ema: float = field(default=0.95, metadata={"min": 0.0, "lt": 1.0})
    """The moving-average factor smoothing the noise scale's two estimates."""

    norm: Literal["exact", "sketch"] = "exact"
    """gnts only: how the global gradient norm is measured under DDP. ``exact``: gradients
    are all-reduced every micro-step. ``sketch``: each rank sketches its own gradients,
    one small all-reduce per micro-step estimates the norm, and gradients are all-reduced
    once per optimizer step (docs/control_loops.md; one process is exact either way, and
    FSDP needs ``exact``)."""
    sketch_size: int | None = field(default=None, metadata=_min(1))
    """norm sketch only: the sketch's length m (``null``: 65536); the norm's relative
    error is about sqrt(2/m), and each micro-step all-reduces m float64."""


@dataclass
class GuardSection:
    """``guard:`` — before each optimizer step, clip each param group's gradient to a
    scheduled norm and skip steps whose gradient norm spikes (docs/control_loops.md).
    Works with any ``control.kind``; its metrics are logged as ``guard/<metric>``."""

    clip_key: str | None = None
    """Optimizer key holding each group's clipping norm (``null``: no clipping); an
    optimizer argument or declared in ``extend``, and usually scheduled."""
    skip_key: str | None = None
    """Optimizer key holding the skip threshold: a step whose total gradient norm exceeds
    it (the max over groups) is skipped (``null``: never skip)."""


@dataclass
class TrainSection:
    """``train:`` — length, batch size, logging, evaluation and checkpoints.

    The budget is exactly one of ``steps``, ``samples`` and ``tokens``: the run stops
    after the first optimizer step at which the clock reaches it (docs/clock.md).
    """

    steps: int | None = field(default=None, metadata=_min(1))
    """Optimizer steps to train for (not micro-steps)."""
    samples: int | None = field(default=None, metadata=_min(1))
    """Samples (rows, over all ranks) to train for."""
    tokens: int | None = field(default=None, metadata=_min(1))
    """Tokens (real target bytes, over all ranks) to train for."""
    axis: Unit = "steps"
    """The step axis of every TensorBoard scalar and Tune report, and the unit that
    ``log_every``, ``eval_every`` and ``checkpoint_every`` count (an event fires at the
    first optimizer step at which the clock crosses a multiple)."""
    micro_batch_size: int = field(default=8, metadata=_min(1))
    """Rows per micro-batch on each rank."""
    log_dir: str | None = None
    """TensorBoard event files and ``metrics.jsonl`` (one line per optimizer step) go
    here; ``null``: no files."""
    log_every: int = field(default=10, metadata=_min(1))
    """Print a log line (and call ``report``) every this many optimizer steps."""
    eval_every: int = field(default=0, metadata=_min(0))
    """Evaluate the held-out loss every this many optimizer steps; 0: only at the end."""
    checkpoint_dir: str | None = None
    """Checkpoints go here, and a run whose folder holds one resumes from it; ``null``:
    no checkpoints."""
    checkpoint_every: int = field(default=0, metadata=_min(0))
    """Checkpoint every this many optimizer steps; 0: only at the end."""
    keep_checkpoints: int = field(default=2, metadata=_min(1))
    """How many of the newest checkpoints to keep (2 leaves a fallback if one is corrupt)."""
    device: str | None = None
    """``cpu``, ``cuda``; ``null`` picks ``cuda:LOCAL_RANK`` when CUDA is available."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """Rank 0's console output: ``auto`` is a tqdm bar on a terminal, plain lines otherwise."""

    def __post_init__(self) -> None:
        given = [unit for unit in UNITS if getattr(self, unit) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"train.{given[1]}", f"expected exactly one budget, got {' and '.join(given)}"
            )

    def budget(self) -> tuple[Unit, int]:
        """``(unit, amount)``: what the run counts to before it stops."""
        for unit in UNITS:
            amount = getattr(self, unit)
            if amount is not None:
                return unit, amount  # type: ignore[return-value]
        raise ConfigError(
            "train", "expected exactly one budget (steps, samples or tokens), got none"
        )


@dataclass
class DistributedSection:
    """``distributed:`` — how the model is wrapped when launched with ``torchrun``."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """``auto``: DDP when more than one process runs, else none. ``fsdp`` is FSDP2
    (``fully_shard`` per transformer block)."""
    timeout_minutes: float = field(default=10.0, metadata={"gt": 0.0})
    """Process-group timeout."""


@dataclass
class TrainConfig:
    """A whole train config (``schedany train CONFIG``)."""

    seed: int = field(default=0, metadata=_min(0))
    """Seeds the model's initialisation, the data stream and the global RNGs."""
    model: ModelSection = field(default_factory=ModelSection)
    """The byte-level transformer's shape."""
    data: DataSection = field(default_factory=DataSection)
    """The corpus and the held-out split."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """The torch optimizer and its param groups."""
    extend: dict[str, float] = field(default_factory=dict)
    """New optimizer keys and their initial values (docs/api.md, the schedule spec)."""
    schedules: dict[str, ScheduleSpec] = field(default_factory=dict)
    """Target key -> schedule (docs/api.md, the schedule spec); at least one."""
    control: ControlSection = field(default_factory=ControlSection)
    """The reactive control loop."""
    guard: GuardSection = field(default_factory=GuardSection)
    """Gradient clipping and spike skipping."""
    train: TrainSection = field(default_factory=TrainSection)
    """Length, batch size, logging and checkpoints."""
    distributed: DistributedSection = field(default_factory=DistributedSection)
    """Wrapping under torchrun."""

    def control_key(self) -> str | None:
        """The optimizer key the controller reads, or None for ``control.kind: none``."""
        if self.control.kind == "none":
            return None
        if self.control.key is not None:
            return self.control.key
        return (
            "logical_batch_size"
            if self.control.kind == "logical_batch"
            else "gradient_norm_threshold"
        )
