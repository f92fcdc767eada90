"""Byte-level text corpus, a resumable sharded micro-batch sampler, and a fixed eval set.

By default the corpus is the Python standard library's own ``.py`` files: real text on
every machine, no download. It is the same on machines running the same Python
version; another version ships other files, so results compare within one version.

Sampler guarantees (:class:`MicroBatchSampler`):

* Sample ``i`` of the global stream is a pure function of ``(seed, i)`` and the corpus.
* At each micro-step, rank ``r`` of ``W`` takes samples
  ``cursor + r*B ... cursor + (r+1)*B - 1`` (``B`` = micro-batch size); then every rank
  advances ``cursor`` by ``W*B``. So ranks never share a sample, and the union over
  ranks at global micro-step ``s`` is samples ``s*W*B ... (s+1)*W*B - 1`` — the same
  data a single process with micro-batch ``W*B`` sees at its micro-step ``s``. What is
  world-size independent is the global sample stream, not the per-rank batches.
* ``state_dict()`` is ``{"seed": int, "cursor": int}``, identical on every rank; loading
  it resumes the stream at exactly the next unseen sample, even under another world size.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..config import DataSection
from ..errors import check_integer, check_real
from .model import IGNORE_INDEX, Batch

__all__ = [
    "Corpus",
    "MicroBatchSampler",
    "eval_batches",
    "load_corpus",
]


# Left out of the default stdlib corpus: installed third-party packages (they differ
# between machines), test suites (odd fixtures) and the generated codec tables.
# The bounds data.eval_fraction is checked with, so a direct call obeys the same rule.
_EVAL_FRACTION_BOUNDS = next(
    f.metadata for f in dataclasses.fields(DataSection) if f.name == "eval_fraction"
)
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
)


class Corpus:
    """A list of byte documents, stored as one ``uint8`` tensor plus offsets.

    Args:
        documents: ``(name, content)`` pairs; documents shorter than 2 bytes (no
            next-byte target) are dropped.
    """

    def __init__(self, documents: Sequence[tuple[str, bytes | Tensor]]) -> None:
        parts = [
            (
                name,
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8),
            )
            if isinstance(data, (bytes, bytearray))
            else (name, data.to(torch.uint8).flatten())
            for name, data in documents
        ]
        kept = [(name, data) for name, data in parts if data.numel() >= 2]
        self.names: tuple[str, ...] = tuple(name for name, _ in kept)
        self.offsets: list[int] = [0]
        for _, data in kept:
            self.offsets.append(self.offsets[-1] + data.numel())
        self.data: Tensor = (
            torch.cat([data for _, data in kept]) if kept else torch.empty(0, dtype=torch.uint8)
        )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_bytes(self) -> int:
        return self.offsets[-1]

    def document(self, index: int) -> Tensor:
        """Document ``index`` as a ``uint8`` view."""
        return self.data[self.offsets[index] : self.offsets[index + 1]]

    def split(
        self, eval_fraction: float = DataSection.eval_fraction, seed: int = 0
    ) -> tuple[Corpus, Corpus]:
        """Split by document into ``(train, held_out)``.

        A document is held out when a hash of ``(seed, name)`` falls under
        ``eval_fraction``, so the split does not depend on the other documents and
        both parts keep path order. Each part gets at least one document.
        """
        check_real(eval_fraction, "eval_fraction", func="Corpus.split", **_EVAL_FRACTION_BOUNDS)
        if len(self) < 2:
            raise ValueError(f"Corpus.split: need at least 2 documents, got {len(self)}")
        scores = [_unit_hash(f"{seed}:{name}") for name in self.names]
        held = [score < eval_fraction for score in scores]
        if not any(held):
            held[min(range(len(self)), key=scores.__getitem__)] = True
        if all(held):
            held[max(range(len(self)), key=scores.__getitem__)] = False
        docs = [(name, self.document(i)) for i, name in enumerate(self.names)]
        train = Corpus([d for d, h in zip(docs, held) if not h])
        return train, Corpus([d for d, h in zip(docs, held) if h])


def _unit_hash(text: str) -> float:
    """A float in [0, 1) from sha256: stable across processes, unlike ``hash()``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    suffixes: Sequence[str] | None = None,
    max_bytes: int = DataSection.max_bytes,
) -> Corpus:
    """Read a folder of text files into a :class:`Corpus`.

    Files are taken in sorted relative-path order (``/`` separators) until ``max_bytes``
    is reached; the last file is cut so the total is exactly the cap. Hidden files and
    folders are skipped.

    Args:
        path: the folder; ``None`` means the standard library
            (``sysconfig.get_paths()["stdlib"]``, without site-packages, tests and codec
            tables).
        suffixes: file endings to keep; ``None`` means ``(".py",)`` for the standard
            library and every file for a folder you name.
        max_bytes: cap on the bytes read.
    """
    if max_bytes < 2:
        raise ValueError(f"load_corpus: max_bytes must be >= 2, got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"] if path is None else path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_corpus: {str(root)!r} is not a folder")
    if suffixes is None and path is None:
        suffixes = (".py",)
    excluded = _STDLIB_EXCLUDED_DIRS if path is None else frozenset()
    names: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in excluded and not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        names += [
            (rel / f).as_posix()
            for f in files
            if not f.startswith(".") and (suffixes is None or f.endswith(tuple(suffixes)))
        ]
    documents: list[tuple[str, bytes]] = []
    total = 0
    for name in sorted(names):
        if total >= max_bytes:
            break
        with open(root / name, "rb") as fh:
            data = fh.read(max_bytes - total)
        documents.append((name, data))
        total += len(data)
    corpus = Corpus(documents)
    if len(corpus) == 0:
        raise ValueError(f"load_corpus: no documents of 2 bytes or more under {str(root)!r}")
    return corpus


def _collate(chunks: Sequence[Tensor], rows: int, seq_len: int) -> Batch:
    """Right-pad ``chunks`` (each 2..seq_len+1 bytes) into a ``(rows, seq_len)`` batch."""
    inputs = torch.zeros(rows, seq_len, dtype=torch.long)
    targets = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    num_tokens = 0
    for row, chunk in enumerate(chunks):
        n = chunk.numel() - 1
        inputs[row, :n] = chunk[:-1]
        targets[row, :n] = chunk[1:]
        num_tokens += n
    return Batch(inputs, targets, num_tokens)


class MicroBatchSampler:
    """Endless, resumable, rank-sharded micro-batches of document chunks.

    Each sample is a chunk of one document: a start byte drawn uniformly over the
    corpus (so long documents are drawn more often), a length drawn uniformly in
    ``[min_len, seq_len]`` target tokens, cut short at the document's end. Token counts
    per micro-batch therefore vary; ``Batch.num_tokens`` carries them. See the module
    docstring for the sharding and resume guarantees.

    Args:
        corpus: training documents.
        micro_batch_size: rows per micro-batch on this rank (``B``).
        seq_len: padded row length; at most the model's ``seq_len``.
        seed: seeds the sample stream.
        rank, world_size: this process's shard.
        min_len: shortest drawn length in target tokens (default ``seq_len // 8``);
            ``min_len = seq_len`` leaves only document ends short.
    """

    def __init__(
        self,
        corpus: Corpus,
        micro_batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        min_len: int | None = None,
    ) -> None:
        min_len = max(1, seq_len // 8) if min_len is None else min_len
        for name, value, low in (
            ("micro_batch_size", micro_batch_size, 1),
            ("seq_len", seq_len, 1),
            ("seed", seed, 0),
            ("world_size", world_size, 1),
            ("min_len", min_len, 1),
        ):
            check_integer(value, name, min=low, func="MicroBatchSampler")
        if min_len > seq_len:
            raise ValueError(f"MicroBatchSampler: min_len={min_len} exceeds seq_len={seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"MicroBatchSampler: rank must be in [0, {world_size}), got {rank!r}")
        if len(corpus) == 0:
            raise ValueError("MicroBatchSampler: the corpus is empty")
        self.corpus = corpus
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.min_len = min_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.cursor = 0
        """Global samples consumed so far (over all ranks); the next micro-step starts here."""

    def sample(self, index: int) -> Tensor:
        """Sample ``index`` of the global stream: a ``uint8`` chunk of 2..seq_len+1 bytes."""
        rng = random.Random(self.seed * 2**64 + index)
        length = rng.randint(self.min_len, self.seq_len) + 1
        start = rng.randrange(self.corpus.num_bytes)
        doc = bisect.bisect_right(self.corpus.offsets, start) - 1
        doc_end = self.corpus.offsets[doc + 1]
        start = min(start, doc_end - 2)  # documents hold >= 2 bytes, so this stays inside
        return self.corpus.data[start : min(start + length, doc_end)]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        first = self.cursor + self.rank * self.micro_batch_size
        chunks = [self.sample(first + j) for j in range(self.micro_batch_size)]
        self.cursor += self.world_size * self.micro_batch_size
        return _collate(chunks, self.micro_batch_size, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "cursor"}`` as plain ints; the same on every rank."""
        return {"seed": self.seed, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["cursor"]`` with the saved seed (strict about keys and types)."""
        if set(state) != {"seed", "cursor"}:
            raise KeyError(
                "MicroBatchSampler.load_state_dict: expected keys ['cursor', 'seed'], got "
                f"{sorted(state)}"
            )
        for key in ("seed", "cursor"):
            check_integer(state[key], key, min=0, func="MicroBatchSampler.load_state_dict")
        self.seed, self.cursor = state["seed"], state["cursor"]


def eval_batches(
    corpus: Corpus,
    batch_size: int,
    seq_len: int,
    *,
    max_windows: int = 256,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch]:
    """The fixed held-out set, as this rank's list of batches.

    Every document is cut into consecutive windows of ``seq_len`` targets (the last one
    of a document is shorter); ``max_windows`` of them, evenly spaced over the corpus,
    are packed in order into batches of ``batch_size`` rows. Rank ``r`` gets batches
    ``r, r + world_size, ...``; ranks with fewer are padded with empty batches
    (``num_tokens == 0``), so every rank runs the same number of forwards (FSDP2 needs
    that). Summing ``loss(..., "sum")`` and ``num_tokens`` over all ranks' batches gives
    the same totals for any world size.
    """
    if batch_size < 1 or seq_len < 1 or max_windows < 1:
        raise ValueError(
            f"eval_batches: batch_size, seq_len and max_windows must be >= 1, "
            f"got {batch_size}, {seq_len}, {max_windows}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"eval_batches: rank must be in [0, {world_size}), got {rank!r}")
    windows: list[tuple[int, int]] = []
    for doc in range(len(corpus)):
        begin, end = corpus.offsets[doc], corpus.offsets[doc + 1]
        windows += [(s, min(s + seq_len + 1, end)) for s in range(begin, end - 1, seq_len)]
    if len(windows) > max_windows:
        windows = [windows[i * len(windows) // max_windows] for i in range(max_windows)]
    chunks = [corpus.data[s:e] for s, e in windows]
    batches = [
        _collate(chunks[i : i + batch_size], batch_size, seq_len)
        for i in range(0, len(chunks), batch_size)
    ]
    per_rank = -(-len(batches) // world_size)
    mine = batches[rank::world_size]
    mine += [_collate([], batch_size, seq_len)] * (per_rank - len(mine))
    return mine
