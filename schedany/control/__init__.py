"""Reactive control loops: training decisions driven by scheduled optimizer keys.

Both controllers share one protocol (see ``docs/control_loops.md``)::

    with ctl.accumulate(num_items=None):   # forward AND backward of one micro-batch
        loss = compute_loss(model, batch)
        loss.backward()
    if ctl.ready:                          # identical on every rank
        optimizer.step(); optimizer.zero_grad(); schedule.step()

- :class:`LogicalBatchSize` — accumulate to a scheduled logical batch size.
- :class:`GradientNormThreshold` — accumulate until the mean gradient's norm is under a
  scheduled threshold (GNTS).
- :class:`schedany.GradientGuard` (in :mod:`schedany.control.guard`) — not a loop but a
  check before ``optimizer.step()``: clip each param group to a scheduled norm, skip
  steps whose gradient norm spikes.

With ``noise_scale=True`` either controller also measures the gradient noise scale.
"""

from .gradient_norm import GradientNormThreshold
from .logical_batch import LogicalBatchSize

__all__ = ["GradientNormThreshold", "LogicalBatchSize"]
