"""A small byte-level causal transformer language model, in plain torch.

The reference job's model: vocabulary 256 (one token per byte), learned position
embeddings, pre-norm blocks, no weight tying (so FSDP2 can shard every block on its
own). Initialisation is a pure function of the seed. Padding is on the right and
marked in the targets with :data:`IGNORE_INDEX`; causal attention then never lets a
real token see a pad, so no extra attention mask is needed.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelSection

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ByteTransformer",
    "VOCAB_SIZE",
    "build_model",
    "loss",
    "param_groups",
]

IGNORE_INDEX = -100
"""Target value of a pad position; such positions add nothing to the loss or the count."""


VOCAB_SIZE = 256
"""One token per byte value."""


class Batch(NamedTuple):
    """One micro-batch of right-padded byte sequences.

    ``inputs`` and ``targets`` are ``(rows, seq_len)`` int64; ``targets`` is
    ``inputs`` shifted left by one, with :data:`IGNORE_INDEX` at pad positions.
    ``num_tokens`` is the number of real targets, counted on the CPU when the batch was
    built (so reading it never syncs a GPU) — the ``num_items`` of a micro-batch.
    """

    inputs: Tensor
    targets: Tensor
    num_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.num_tokens,
        )


class _Block(nn.Module):
    def __init__(self, config: ModelSection) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, config.mlp_ratio * d)
        self.out = nn.Linear(config.mlp_ratio * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class ByteTransformer(nn.Module):
    """Causal transformer LM over bytes: ``(rows, t)`` int64 ids -> ``(rows, t, vocab)`` logits.

    Args:
        config: the model's shape.
        seed: initialisation seed; the same seed gives bitwise the same weights,
            whatever the global RNG state (a private generator is used).
    """

    def __init__(self, config: ModelSection | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config = config or ModelSection()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        # No bias (as in GPT-2): a biased Linear on 3-D input returns a view, which
        # FSDP2 warns about at the root module's output.
        self.head = nn.Linear(config.d_model, VOCAB_SIZE, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """GPT-2 style init from ``seed``: N(0, 0.02), residual outputs scaled by depth."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)

        def normal_(w: Tensor, std: float) -> None:
            # Drawn on the CPU and copied, so the weights do not depend on the device.
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * std)

        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, 0.02)
            elif isinstance(module, nn.Linear):
                residual = name.endswith((".proj", ".out"))
                normal_(module.weight, residual_std if residual else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.config.seq_len:
            raise ValueError(
                f"ByteTransformer: input length {t} exceeds seq_len={self.config.seq_len}"
            )
        pos = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(config: ModelSection | None = None, seed: int = 0) -> ByteTransformer:
    """Build a :class:`ByteTransformer` on the CPU, initialised from ``seed``."""
    return ByteTransformer(config, seed)


def loss(
    model: nn.Module, batch: Batch, reduction: Literal["sum", "mean"] = "mean"
) -> tuple[Tensor, int]:
    """Next-byte cross-entropy of ``model`` on ``batch``.

    Returns ``(loss, num_tokens)``: with ``reduction="sum"`` the loss is the sum over the
    batch's real target tokens (what a controller's ``num_items`` mode expects, with
    ``num_items=num_tokens``); with ``"mean"`` it is that sum divided by ``num_tokens``.
    ``model`` may be wrapped (DDP, FSDP2). A batch with no real token gives a sum of 0
    and a mean of NaN.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss: reduction must be 'sum' or 'mean', got {reduction!r}")
    logits = model(batch.inputs)
    total = F.cross_entropy(
        logits.flatten(0, 1).float(),
        batch.targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if reduction == "sum":
        return total, batch.num_tokens
    return total / batch.num_tokens, batch.num_tokens


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into named optimizer param groups.

    Returns ``[{"name": "decay", "params": [...]}, {"name": "no_decay", "params": [...],
    "weight_decay": 0.0}]``: ``decay`` holds weight matrices, ``no_decay`` holds biases,
    norm parameters and embeddings. ``weight_decay``, when given, is set on ``decay``;
    otherwise it inherits the optimizer's default. The ``name`` entries are what
    TensorBoard tags use (``schedule/weight_decay/decay``). Works on a plain, DDP or
    FSDP2 module (call it after wrapping, so the params are the ones that train);
    empty groups are left out.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"name": "decay", "params": decay})
        if weight_decay is not None:
            groups[-1]["weight_decay"] = weight_decay
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups
