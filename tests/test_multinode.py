"""Two "nodes" on one machine: two copies of distributed/launch.sh on loopback, c10d
rendezvous, forming one 2-rank DDP job.

Invariants: the two-node job equals a single-node torchrun job of the same world size;
a worker killed on one node makes both nodes restart (within the restart budget) and
the job finishes from its last checkpoint, equal to the uninterrupted run (the
single-node run, shared with other files: conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from _job_runs import (
    GNTS,
    STEPS,
    TINY,
    fault,
    final_params,
    finish,
    records,
    run_args,
    sets,
)

LAUNCHER = Path(__file__).resolve().parents[1] / "distributed" / "launch.sh"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(
    run: Path, max_restarts: int, env: dict[str, str] | None = None
) -> list[subprocess.Popen[str]]:
    node_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "JOB_ID": f"test-{uuid.uuid4().hex[:8]}",
        "MAX_RESTARTS": str(max_restarts),
        "RDZV_TIMEOUT": "60",
        **(env or {}),
    }
    argv = [GNTS, *sets([*TINY, "distributed.strategy=ddp"]), *run_args(run)]
    return [
        subprocess.Popen(
            ["bash", str(LAUNCHER), *argv],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=node_env,
        )
        for _ in range(2)
    ]


def finish_nodes(nodes: list[subprocess.Popen[str]]) -> str:
    outputs = []
    for node in nodes:
        code, out, err = finish(node)
        assert code == 0, f"node exited {code}\n{out}\n{err[-4000:]}"
        outputs.append(out + err)
    return "\n".join(outputs)


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = a[key].abs().max().clamp_min(1e-12)
        assert ((a[key] - b[key]).abs().max() / scale).item() <= 1e-6, key


def test_two_nodes_form_one_job_equal_to_one_node(tmp_path, tiny_reference):
    # The single-node job: the session's shared torchrun DDP run of `TINY` (conftest.py).
    reference, two = tiny_reference("ddp"), tmp_path / "two_nodes"
    nodes = start_nodes(two, max_restarts=0)
    output = finish_nodes(nodes)
    single = reference.done()
    two_records, single_records = records(two), records(single)
    assert [r["step"] for r in two_records] == list(range(1, STEPS + 1))
    assert [r["schedule"] for r in two_records] == [r["schedule"] for r in single_records]
    assert [r["micro_steps"] for r in two_records] == [r["micro_steps"] for r in single_records]
    manifest = json.loads((two / "ckpt" / f"step_{STEPS:08d}" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2  # one job across both nodes, not two 1-rank jobs
    assert_same_params(final_params(single, tmp_path), final_params(two, tmp_path))
    assert "Traceback" not in output


def test_worker_killed_on_one_node_restarts_the_job_from_its_checkpoint(tmp_path, tiny_reference):
    # The uninterrupted job: the single-node one, which the two-node job equals (above).
    reference, killed = tiny_reference("ddp"), tmp_path / "killed"
    nodes = start_nodes(killed, max_restarts=1, env=fault(killed, 5, rank=1))
    output = finish_nodes(nodes)
    clean = reference.done()
    assert (killed / "fault.marker").exists(), "the fault never fired"
    assert "at step 4" in output  # resumed from the step-4 checkpoint
    resumed = records(killed)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["schedule"] for r in resumed] == [r["schedule"] for r in records(clean)]
    assert_same_params(final_params(clean, tmp_path), final_params(killed, tmp_path))
