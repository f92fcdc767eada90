"""CountSketch of the local gradients: the global squared norm from one small all-reduce.

See ``docs/control_loops.md`` (sketched norms) for the math. The local gradients, in
parameter order, are cut into *blocks* of ``m`` consecutive elements of one parameter
(a parameter's last block may be shorter). Block ``p`` draws its own hash parameters
``(v_p, c_p, H_p)``, and element ``a`` of it (``0 <= a < m``) is added to bucket
``(a + H_p) mod m`` with sign

.. math::
    s_p(a) = (-1)^{c_p + \\operatorname{popcount}(a \\,\\&\\, v_p)}

(a random Walsh function: the signs of one block are pairwise independent, blocks are
independent). The sketch is linear, so the sum over ranks of every rank's sketch is the
sketch of the summed gradient, and its squared norm estimates that gradient's squared
norm without bias, with relative standard deviation at most ``sqrt(2/m)``.

No index tensor the size of the model is made: a block's signs come from two vectors of
about ``sqrt(m)`` entries (``v_p``'s low and high bits, since ``popcount`` adds over
them), and its buckets are a cyclic shift, one contiguous slice of a sketch of twice the
length (whose halves are added at the end). On the CPU each block is an ``outer`` and an
``addcmul_`` (one block of scratch); elsewhere up to ``_CHUNK`` elements of full blocks go
through one ``index_add_`` (one chunk of scratch), a few kernels instead of two per
block. Both give the same sketch up to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentValueError
from ._comm import DataParallelGroup, Header
from ._grad_sync import ModelKind

_CHUNK = 1 << 22
"""Elements of full blocks sketched per ``index_add_`` off the CPU: the scratch memory is a
few times this, whatever the model."""
_DRAW = 256
"""Blocks whose hash parameters one call of the generator draws (in block order, so the
values do not depend on how the blocks are walked)."""


def check_sketchable(model: nn.Module, kind: ModelKind, owner: str) -> None:
    """Refuse the wrappers a sketched norm cannot serve with the guarantees of an exact one
    (why: ``docs/control_loops.md``)."""
    if kind in ("fsdp1", "fsdp2"):
        raise ArgumentValueError(
            owner,
            "norm",
            "sketch",
            "'exact' for an FSDP model (pass norm=\"exact\"): with sync off FSDP keeps every "
            "gradient unsharded, and it has no way to reduce-scatter them after the "
            "backward; see docs/control_loops.md",
        )
    if getattr(model, "static_graph", False):
        raise ArgumentValueError(
            owner,
            "norm",
            "sketch",
            "'exact' for DDP with static_graph=True (pass norm=\"exact\"): a static graph "
            "fails on a backward under no_sync() before its first synced one, and a "
            "sketched norm keeps every micro-step's backward under no_sync()",
        )


def stream_seed(seed: int, logical_batch: int, micro_step: int) -> int:
    """The generator seed of one micro-step's hashes: the same on every rank and after a
    resume (it depends only on the controller's seed and where the loop is)."""
    data = struct.pack("=qqq", seed, logical_batch, micro_step)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=8)
def _walsh_table(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``n x n`` table ``(-1)**popcount(v & a)`` (Sylvester's Hadamard matrix): row
    ``v`` is the Walsh function ``v``, read with one ``index_select`` per block group."""
    table = torch.ones(1, 1, dtype=dtype)
    while table.shape[0] < n:
        table = torch.cat([torch.cat([table, table], 1), torch.cat([table, -table], 1)], 0)
    return table.to(device)


class _Hashes:
    """Per-block hash parameters, drawn ``_DRAW`` blocks at a time in block order, and the
    signs they define."""

    def __init__(self, size: int, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        bits = (size - 1).bit_length()  # 2**bits >= size
        self.size = size
        self.lo = 1 << ((bits + 1) // 2)  # a = hi * lo + (a % lo); lo * hi = 2**bits
        self.hi = 1 << (bits - (bits + 1) // 2)
        self.device, self.dtype = device, dtype
        self._generator = torch.Generator().manual_seed(seed)
        self._drawn, self._used = torch.empty(4, _DRAW, dtype=torch.int64), _DRAW
        self._limits = torch.tensor([[self.lo], [self.hi], [2], [size]])
        self._lo_rows = _walsh_table(self.lo, device, dtype)
        self._hi_rows = _walsh_table(self.hi, device, dtype)

    def take(self, count: int) -> Tensor:
        """The next ``count`` blocks' ``[v_lo, v_hi, c, H]`` columns, a (4, count) CPU tensor."""
        parts = []
        while count:
            if self._used == _DRAW:
                self._drawn = torch.randint(0, 2**62, (4, _DRAW), generator=self._generator)
                self._used = 0
            n = min(count, _DRAW - self._used)
            parts.append(self._drawn[:, self._used : self._used + n])
            self._used, count = self._used + n, count - n
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)) % self._limits

    def sign_factors(self, drawn: Tensor) -> tuple[Tensor, Tensor]:
        """Per block, ``(hi_signs, lo_signs)``: the block's sign of ``a`` is
        ``hi_signs[a // lo] * lo_signs[a % lo]``."""
        v_lo, v_hi, c = (drawn[i].to(self.device) for i in range(3))
        lo = self._lo_rows.index_select(0, v_lo)
        hi = self._hi_rows.index_select(0, v_hi)
        return hi * (1 - 2 * c[:, None]).to(self.dtype), lo


def count_sketch(
    grads: Sequence[Tensor | None],
    numels: Sequence[int],
    size: int,
    seed: int,
    *,
    vectorized: bool | None = None,
) -> Tensor:
    """The CountSketch (length ``size``) of the tensors ``grads``, flattened and in order.

    ``numels[i]`` is the element count of ``grads[i]``; a ``None`` gradient counts as
    zeros of that size but still uses up its blocks' hashes, so every rank hashes every
    parameter the same way whichever gradients it holds. ``vectorized`` picks the
    ``index_add_`` path (default: off the CPU only). The sketch is float64 if any
    gradient is, else float32, on the first gradient's device.
    """
    present = [g for g in grads if g is not None]
    device = present[0].device if present else torch.device("cpu")
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in present) else torch.float32
    if vectorized is None:
        vectorized = device.type != "cpu"
    hashes = _Hashes(size, seed, device, dtype)
    # Twice the length, so a block's cyclic shift is one contiguous slice; the halves
    # are folded at the end.
    doubled = torch.zeros(2 * size, dtype=dtype, device=device)
    rows = max(1, _CHUNK // size)
    with torch.no_grad():
        for grad, numel in zip(grads, numels, strict=True):
            flat = None if grad is None else grad.detach().reshape(-1).to(device)
            start = 0
            while start < numel:
                count = min(rows, (numel - start) // size) or 1  # full blocks, or the tail
                drawn = hashes.take(count)
                length = min(count * size, numel - start)
                if flat is not None:
                    piece = flat[start : start + length]
                    if vectorized and length == count * size:
                        _add_rows(doubled, piece.view(count, size), hashes, drawn)
                    else:
                        _add_blocks(doubled, piece, hashes, drawn)
                start += length
        return doubled[:size] + doubled[size:]


def _add_blocks(doubled: Tensor, piece: Tensor, hashes: _Hashes, drawn: Tensor) -> None:
    """One block at a time: its signs into a block of scratch, then one ``addcmul_``."""
    size, lo = hashes.size, hashes.lo
    scratch = torch.empty(hashes.hi * lo, dtype=doubled.dtype, device=doubled.device)
    table, signs = scratch.view(hashes.hi, lo), scratch[:size]
    his, los = hashes.sign_factors(drawn)
    for block, hi, lo_signs, shift in zip(
        piece.split(size), his.unbind(0), los.unbind(0), drawn[3].tolist()
    ):
        n = block.numel()
        if n == size:
            torch.outer(hi, lo_signs, out=table)
        else:  # a short last block needs only its first rows of signs
            used = -(-n // lo)
            torch.outer(hi[:used], lo_signs, out=scratch[: used * lo].view(used, lo))
        doubled[shift : shift + n].addcmul_(block, signs if n == size else signs[:n])


def _add_rows(doubled: Tensor, rows: Tensor, hashes: _Hashes, drawn: Tensor) -> None:
    """Full blocks, one per row, in one ``index_add_`` (fewer kernels on a GPU)."""
    count, size = rows.shape
    hi, lo = hashes.sign_factors(drawn)
    signs = (hi[:, :, None] * lo[:, None, :]).reshape(count, -1)[:, :size]
    shifts = drawn[3, :, None].to(doubled.device)
    index = torch.arange(size, device=doubled.device)[None, :] + shifts
    doubled.index_add_(0, index.reshape(-1), (rows * signs).reshape(-1).to(doubled.dtype))


class SketchedNorm:
    """``‖S‖²`` of the gradient DDP would average, from each rank's local gradients.

    Gradient sync stays off between micro-steps; each micro-step every rank sketches its
    accumulated local gradient ``L_r``, one all-reduce sums the sketches (with the
    items and the header check), and ``‖Σ_r C(L_r)‖² / W²`` estimates
    ``‖(1/W) Σ_r L_r‖²``, the squared norm of what DDP's all-reduce would leave.
    """

    def __init__(self, model: nn.Module, size: int) -> None:
        self.size = size
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._numels = [p.numel() for p in self._params]

    def exchange(
        self, dp: DataParallelGroup, header: Header, items: int, where: str, key: str, seed: int
    ) -> tuple[int, float]:
        """Items summed over ranks and the estimated global ``‖S‖²``, in one all-reduce;
        ``seed`` is the controller's, the micro-step's hashes are drawn from it."""
        grads = [p.grad for p in self._params]
        seed = stream_seed(seed, header.logical_batch, header.micro_step)
        sketch = count_sketch(grads, self._numels, self.size, seed)
        total, summed = dp.all_reduce_sum(header, items, sketch, where, key)
        squares = float(summed.to(torch.float64).square().sum())
        return total, squares / dp.size**2  # a NaN or inf stays one: the batch is dropped
