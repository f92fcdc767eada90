"""A checkpoint moves between world sizes (docs/operations.md): 2 ranks -> 1 process -> 2
ranks, with DDP and none, and with FSDP2 throughout.

Invariant: holding the global batch (2 ranks x 4 rows = 1 process x 8 rows) and with the
controller counting tokens, a run that changes world size twice equals a run that never
does. Exactly: every step's scheduled values, micro-steps, token and sample counts (so
the data stream went on at the first unseen sample, none repeated or skipped) and the
controller's counters. To float tolerance: losses and gradient norms, and the parameters
(within 1e-3 relative: one process sums in another order than two, and Adam's division
by the root of tiny second moments magnifies that).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _job_runs import (
    GNTS,
    STEPS,
    TINY,
    final_params,
    launch,
    max_relative_difference,
    ok,
    records,
    run_args,
    sets,
)

TWO = ["--nproc-per-node", "2"]


def argv(run: Path, steps: int, *more: str) -> list[str]:
    return ["train", GNTS, *sets([*TINY, f"train.steps={steps}", *more]), *run_args(run)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, one_process, one_launcher",
    [
        ("ddp", "distributed.strategy=none", None),
        # FSDP2 needs a process group, so its one process runs under torchrun.
        ("fsdp", "distributed.strategy=fsdp", ["--nproc-per-node", "1"]),
    ],
    ids=["ddp-none-ddp", "fsdp-fsdp-fsdp"],
)
def test_two_ranks_then_one_process_then_two_ranks_equals_two_ranks_throughout(
    tmp_path, tiny_reference, strategy, one_process, one_launcher
):
    # Two ranks throughout: the shared run of `TINY` under this strategy (conftest.py).
    ref, moved = tiny_reference(strategy), tmp_path / "moved"
    two_ranks = f"distributed.strategy={strategy}"
    ok(launch(argv(moved, 3, two_ranks), torchrun=TWO))
    one = ok(launch(argv(moved, 6, one_process, "train.micro_batch_size=8"), torchrun=one_launcher))
    assert "at step 3" in one
    assert "at step 6" in ok(launch(argv(moved, STEPS, two_ranks), torchrun=TWO))
    reference = ref.done()

    a, b = records(reference), records(moved)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["schedule"] for r in a] == [r["schedule"] for r in b]
    assert [r["micro_steps"] for r in a] == [r["micro_steps"] for r in b]
    assert [r["clock"] for r in a] == [r["clock"] for r in b]  # global samples and tokens
    assert {r["micro_steps"] for r in a} != {1}, "GNTS never accumulated"
    for x, y in zip(a, b):
        for key in ("items", "optimizer_steps", "dropped_batches", "micro_steps"):
            assert x["control"][key] == y["control"][key], (x["step"], key)
        assert x["control"] == pytest.approx(y["control"], rel=1e-4)
    # Each stage ends at its budget (steps 3 and 6) with a report of its own, so the
    # report windows coincide again from step 7 on.
    for x, y in zip(a[6:], b[6:]):
        assert x.keys() == y.keys()
        for key in ("train/loss", "eval/loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)
    difference = max_relative_difference(
        final_params(reference, tmp_path, STEPS), final_params(moved, tmp_path, STEPS)
    )
    assert difference <= 1e-3
