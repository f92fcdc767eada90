"""The job's two losses: the train loss since the last report and the held-out loss,
both per token and over all ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import unwrap_model
from .model import Batch
from .model import loss as lm_loss


class TrainLoss:
    """The summed train loss since the last :meth:`take`, kept on the device (no sync per
    micro-step), and its token count (a CPU int already: ``Batch.num_tokens``)."""

    def __init__(self, device: torch.device) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._tokens = 0

    def add(self, total: Tensor, tokens: int) -> None:
        """One micro-batch: its summed loss (detached here) over ``tokens`` tokens."""
        self._sum += total.detach()
        self._tokens += tokens

    def window(self) -> tuple[float, int]:
        """The summed loss and tokens since the last :meth:`take`, over all ranks (a
        collective under torchrun); a checkpoint keeps it, so a resumed run's first
        report covers the same steps as the uninterrupted run's."""
        window = torch.stack([self._sum, self._sum.new_tensor(float(self._tokens))])
        if dist.is_initialized():
            dist.all_reduce(window)
        loss_sum, tokens = window.tolist()  # one host sync
        return loss_sum, int(tokens)

    def restore(self, loss_sum: float, tokens: int) -> None:
        """Start from a saved :meth:`window` (on one rank: it holds the global sums)."""
        self._sum.fill_(loss_sum)
        self._tokens = int(tokens)

    def take(self) -> float:
        """Mean per-token train loss since the last call, over all ranks."""
        loss_sum, tokens = self.window()
        self._sum.zero_()
        self._tokens = 0
        return loss_sum / tokens if tokens > 0 else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """Per-token loss on the fixed held-out ``batches``, over all ranks."""
    net = unwrap_model(model)  # DDP: the plain module, no collectives; FSDP: itself
    net.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        total, n = lm_loss(net, batch.to(device), "sum")
        sums[0] += total.to(torch.float64)
        sums[1] += n
    net.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return float(sums[0] / sums[1])
