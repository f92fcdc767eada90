"""Spawn small multi-rank gloo jobs from pytest, on CPU, with hard deadlines.

``run_ranks(fn, ...)`` starts ``world_size`` processes, each joining a gloo process
group through ``init_method=file://...`` with a short process-group timeout (so a
collective without a partner raises instead of hanging), calls
``fn(rank, world_size, **kwargs)`` and returns every rank's result. A job that outlives
``deadline_s`` is killed and the test fails with ``TimeoutError``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "count_collectives"]

_COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "barrier",
)


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    tmp: str,
    pg_timeout_s: float,
    destroy: bool,
    kwargs: dict[str, Any],
) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine with other test runs
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmp, 'init')}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    try:
        result = fn(rank, world_size, **kwargs)
    finally:
        if destroy:
            dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    deadline_s: float = 90.0,
    pg_timeout_s: float = 30.0,
    destroy: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; return results.

    ``fn`` must be a module-level function (it is pickled by name). ``destroy=False``
    skips ``destroy_process_group`` for jobs that leave a group broken on purpose.
    """
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, tmp, pg_timeout_s, destroy, kwargs),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + deadline_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{fn.__name__} did not finish within {deadline_s} s")
        return [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count Python-level ``torch.distributed`` collectives; they still run.

    DDP's and FSDP's own gradient reductions run in C++ and are not counted here
    (count those with a DDP comm hook), so the counter sees what schedany adds.
    """
    counts: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
