"""schedany: any torch scheduler on any optimizer hyperparameter.

The package reads as a map of the problem:

- :mod:`schedany.curves` — pure ``step -> multiplier`` curves (no torch).
- ``_targets`` / ``_proxy`` / ``_binding`` — where a schedule writes, and the proxy
  that lets a stock scheduler write there.
- ``_synchronous`` — the coordinator that steps several schedules as one.
- ``_clock`` — the training clock (steps, samples, tokens) schedules may count.
- ``_builtins`` — the fourteen built-in schedules (curve + LambdaLR + bind).
- ``_optimizer_utils`` — extend an optimizer with new keys, read them back.
- :mod:`schedany.control` — reactive control loops that respond to scheduled values
  (logical batch size, gradient norm threshold), exact under DDP and FSDP2, and the
  gradient guards (scheduled clipping, spike skipping).
- :mod:`schedany.config` — the YAML schedule/run config (``build_schedule``).
- :mod:`schedany.job` — the reference training job behind ``schedany train``.
- :mod:`schedany.integrations` — TensorBoard, Ray Tune, Lightning and the HF Trainer
  (imported lazily).
"""

from ._binding import arbitrary_schedule_factory
from ._builtins import (
    constant_schedule,
    constant_with_inverse_warmup,
    constant_with_warmup,
    cosine_annealing_with_inverse_warmup,
    cosine_annealing_with_warmup,
    linear_schedule_with_inverse_warmup,
    linear_schedule_with_warmup,
    polynomial_schedule_with_inverse_warmup,
    polynomial_schedule_with_warmup,
    quadratic_schedule_with_inverse_warmup,
    quadratic_schedule_with_warmup,
    sqrt_schedule_with_inverse_warmup,
    sqrt_schedule_with_warmup,
    warmup_stable_decay,
    warmup_to_constant,
)
from ._clock import Clock
from ._optimizer_utils import extend_optimizer, get_param_groups_regrouped_by_key
from ._synchronous import SynchronousSchedule
from .config import ConfigError, build_schedule, load_config, register_curve
from .control import GradientNormThreshold, LogicalBatchSize
from .control.guard import GradientGuard

__version__ = "0.1.0"

__all__ = [
    "arbitrary_schedule_factory",
    "SynchronousSchedule",
    "Clock",
    "extend_optimizer",
    "get_param_groups_regrouped_by_key",
    "cosine_annealing_with_warmup",
    "cosine_annealing_with_inverse_warmup",
    "polynomial_schedule_with_warmup",
    "polynomial_schedule_with_inverse_warmup",
    "linear_schedule_with_warmup",
    "linear_schedule_with_inverse_warmup",
    "quadratic_schedule_with_warmup",
    "quadratic_schedule_with_inverse_warmup",
    "sqrt_schedule_with_warmup",
    "sqrt_schedule_with_inverse_warmup",
    "constant_with_warmup",
    "constant_with_inverse_warmup",
    "constant_schedule",
    "warmup_to_constant",
    "warmup_stable_decay",
    "LogicalBatchSize",
    "GradientNormThreshold",
    "GradientGuard",
    "build_schedule",
    "load_config",
    "register_curve",
    "ConfigError",
]
