"""The checks of ``benchmarks/gpu_check.sh``, one sub-command each (run them from there).

    python benchmarks/gpu_check.py jobs   --device cuda   # the job, each control kind
    python benchmarks/gpu_check.py sketch --device cuda   # sketch vs exact at >= 100 M params
    python benchmarks/gpu_check.py ddp    --device cuda   # 2 DDP ranks on one GPU (gloo)

``--smoke`` shrinks every check to seconds, so the script can be tried on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from schedany.config import ModelSection
from schedany.control import GradientNormThreshold
from schedany.control._sketch import count_sketch, stream_seed
from schedany.job.model import Batch, build_model, loss

ROOT = Path(__file__).resolve().parents[1]
SIZES = [2**14, 2**16, 2**18]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. the reference job, each control kind ------------------------------------------------


def jobs(args: argparse.Namespace) -> None:
    """``schedany train`` on the device for every control kind; a line per run."""
    steps = 3 if args.smoke else 40
    runs = {
        "none": ("baseline.yaml", []),
        "logical_batch": ("logical_batch.yaml", []),
        "gnts": ("gnts.yaml", []),
        "gnts, norm sketch": ("gnts.yaml", ["control.norm=sketch", "control.sketch_size=4096"]),
    }
    print(f"{'control':<20} {'exit':>4} {'s':>6} {'steps':>5} {'micro':>6} {'last loss':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, extra) in runs.items():
            log_dir = Path(tmp) / name.replace(", ", "_").replace(" ", "_")
            overrides = [
                f"train.device={args.device}",
                f"train.steps={steps}",
                f"train.log_dir={log_dir}",
                "train.checkpoint_dir=null",
                "train.eval_every=0",
                "train.progress=none",
                *extra,
            ]
            if args.smoke:
                overrides += ["data.max_bytes=65536", "data.eval_windows=4", "model.seq_len=32"]
            command = [
                sys.executable,
                "-m",
                "schedany",
                "train",
                str(ROOT / "examples/configs" / config),
            ]
            command += [f"--set={o}" for o in overrides]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            elapsed = time.perf_counter() - start
            lines = (
                (log_dir / "metrics.jsonl").read_text().splitlines() if done.returncode == 0 else []
            )
            last = json.loads(lines[-1]) if lines else {}
            micro = sum(json.loads(line)["micro_steps"] for line in lines)
            print(
                f"{name:<20} {done.returncode:>4} {elapsed:6.1f} {len(lines):>5} {micro:>6} "
                f"{last.get('train/loss', float('nan')):9.4f}"
            )
            if done.returncode != 0:
                print(done.stderr[-2000:])


# --- 2. sketch vs exact at a realistic size --------------------------------------------------


def sketch(args: argparse.Namespace) -> None:
    """A >= 100 M-parameter byte transformer: time of a micro-step's forward+backward, of
    the exact norm and of each sketch, and the sketch's error on the norm."""
    device = torch.device(args.device)
    shape = (
        ModelSection(d_model=64, n_layers=2, n_heads=4, seq_len=64)
        if args.smoke
        else ModelSection(d_model=1024, n_layers=8, n_heads=16, seq_len=512)
    )
    model = build_model(shape).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    numels = [p.numel() for p in params]
    rows = 2 if args.smoke else 8
    g = torch.Generator().manual_seed(0)

    def micro_step() -> None:
        inputs = torch.randint(0, 256, (rows, shape.seq_len), generator=g)
        batch = Batch(inputs.to(device), inputs.roll(-1, 1).to(device), rows * shape.seq_len)
        loss(model, batch)[0].backward()

    def timed(fn: Any, repeat: int) -> float:
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync(device)
        return (time.perf_counter() - start) / repeat * 1e3

    repeat = 2 if args.smoke else 10
    backward_ms = timed(micro_step, repeat)
    grads = [p.grad for p in params]
    exact = float(torch.nn.utils.get_total_norm(grads).double())
    norm_ms = timed(lambda: float(torch.nn.utils.get_total_norm(grads)), repeat)
    print(
        f"{device}, torch {torch.__version__}: {sum(numels) / 1e6:.1f} M params "
        f"({len(params)} tensors), micro-batch {rows} x {shape.seq_len} tokens"
    )
    print(f"forward+backward {backward_ms:8.2f} ms/micro-step;  exact norm {norm_ms:6.2f} ms")
    draws = 5 if args.smoke else 50
    print(f"{'m':>8} {'median err':>10} {'p99 err':>8} {'index_add ms':>12} {'blocks ms':>9} x bwd")
    for size in SIZES:
        errors = []
        for d in range(draws):  # hash seeds as the controller draws them
            estimate = count_sketch(grads, numels, size, stream_seed(0, d, 0), vectorized=True)
            errors.append(abs(float(estimate.double().norm()) / exact - 1))
        q = torch.tensor(errors, dtype=torch.float64)
        # the GPU's path, then the CPU's per-block one (a kernel launch or two per block)
        times = [
            timed(functools.partial(count_sketch, grads, numels, size, 1, vectorized=v), repeat)
            for v in (True, False)
        ]
        print(
            f"{size:>8} {q.median():10.5f} {q.quantile(0.99):8.5f} {times[0]:12.2f} "
            f"{times[1]:9.2f} {times[0] / backward_ms:.3f}"
        )


# --- 3. two DDP ranks on one device ----------------------------------------------------------


def _counting_hook(calls, bucket):  # type: ignore[no-untyped-def]  # DDP reads annotations
    calls[0] += 1
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def _ddp_worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    device = torch.device(args.device)
    dist.init_process_group(
        "gloo",  # two ranks on one GPU: NCCL refuses a device shared by ranks, gloo does not
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    width = 32 if args.smoke else 1024
    steps, k, size = (3, 4, 256) if args.smoke else (20, 8, 2**16)
    result = {}
    for norm in ("exact", "sketch"):
        torch.manual_seed(0)
        model = DDP(
            nn.Sequential(
                nn.Linear(width, 2 * width),
                nn.Tanh(),
                nn.Linear(2 * width, width),
                nn.Tanh(),
                nn.Linear(width, 1),
            ).to(device)
        )
        calls = [0]
        model.register_comm_hook(calls, _counting_hook)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        opt.param_groups[0]["gradient_norm_threshold"] = 0.0
        ctl = GradientNormThreshold(
            model, opt, max_accumulation_steps=k, norm=norm, sketch_size=size
        )
        g = torch.Generator().manual_seed(rank)
        errors, times = [], []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            for _ in range(k):
                x = torch.randn(16, width, generator=g).to(device)
                with ctl.accumulate():
                    nn.functional.mse_loss(model(x), x[:, :1]).backward()
                if ctl.ready:
                    exact = float(
                        torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
                    )
                    errors.append(abs(ctl.metrics()["grad_norm"] / exact - 1))
                    opt.step()
                    opt.zero_grad()
            sync(device)
            times.append(time.perf_counter() - start)
        result[norm] = {
            "s/step": statistics.median(times[1:] or times),
            "hook calls/step": calls[0] / steps,
            "closing error": statistics.median(errors),
        }
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def ddp(args: argparse.Namespace) -> None:
    """Exact vs sketched GNTS on 2 gloo ranks sharing the device."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2)
        result = torch.load(out, weights_only=False)
    print(f"{'norm':<7} {'s/step':>8} {'hook calls/step':>15} {'norm error at close':>19}")
    for norm, row in result.items():
        print(
            f"{norm:<7} {row['s/step']:8.4f} {row['hook calls/step']:15.1f} "
            f"{row['closing error']:19.5f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["jobs", "sketch", "ddp"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU smoke test)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available (use --device cpu --smoke)")
    {"jobs": jobs, "sketch": sketch, "ddp": ddp}[args.check](args)


if __name__ == "__main__":
    main()
