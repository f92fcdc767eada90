"""StepFlags: a request raised on one rank is agreed on by every rank at the same call,
and the counts given to that call are summed over the ranks."""

from __future__ import annotations

import os
import signal

import pytest

from schedany.job._step_flags import StepFlags
from tests._dist_utils import count_collectives, run_ranks


def test_one_process_returns_raised_flags_without_a_collective() -> None:
    flags = StepFlags("preempt", "edits")
    assert flags.agree() == (frozenset(), ())
    flags.raise_flag("edits")
    assert flags.agree().raised == {"edits"}
    assert flags.agree((7, 3)) == ({"edits"}, (7, 3))  # sticky until its owner lowers it
    flags.lower("edits")
    assert flags.agree().raised == frozenset()


def test_raised_from_a_real_signal_handler() -> None:
    flags = StepFlags("preempt")
    previous = signal.signal(signal.SIGUSR1, lambda *_: flags.raise_flag("preempt"))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flags.agree().raised == {"preempt"}
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_bad_names() -> None:
    with pytest.raises(ValueError, match="distinct"):
        StepFlags("a", "a")
    with pytest.raises(KeyError, match="unknown step flag 'b'"):
        StepFlags("a").raise_flag("b")


def _agree_on_two_ranks(rank: int, world_size: int) -> list:
    flags = StepFlags("preempt", "edits")
    seen = []
    with count_collectives() as counts:
        for step in range(4):
            if rank == 1 and step == 1:
                flags.raise_flag("preempt")
            if rank == 0 and step == 2:
                flags.raise_flag("edits")
            if rank == 0 and step == 3:
                flags.lower("edits")
            raised, sums = flags.agree((rank + 1, step))
            seen.append([sorted(raised), list(sums)])
    return [seen, counts["all_reduce"]]


@pytest.mark.slow
def test_two_ranks_agree_at_the_same_step() -> None:
    results = run_ranks(_agree_on_two_ranks, world_size=2)
    raised = [[], ["preempt"], ["edits", "preempt"], ["preempt"]]
    expected = [[r, [3, 2 * step]] for step, r in enumerate(raised)]
    assert [seen for seen, _ in results] == [expected, expected]
    assert [calls for _, calls in results] == [4, 4]  # one collective per agreement
