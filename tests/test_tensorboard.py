"""ScheduleLogger: real event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import copy
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    SCALARS,
    EventAccumulator,
)
from torch.optim.lr_scheduler import StepLR  # noqa: E402

import schedany  # noqa: E402
from schedany.integrations.tensorboard import ScheduleLogger, write_hparams  # noqa: E402

KEYS = ["lr", "weight_decay", "betas[0]", "gradient_norm_threshold"]
GROUPS = ["pg0", "head", "pg2"]


def f32(x: float) -> float:
    """TensorBoard stores scalars as float32; compare exactly after the same rounding."""
    return struct.unpack("f", struct.pack("f", x))[0]


class FakeController:
    """Stands in for a reactive controller: metrics() changes every step."""

    def __init__(self) -> None:
        self.calls = 0

    def metrics(self) -> dict[str, float]:
        self.calls += 1
        return {"grad_norm": 1.0 / self.calls, "micro_steps": float(self.calls % 3 + 1)}


def make_run(
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, schedany.SynchronousSchedule]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "name": "head", "lr": 0.005},
            {"params": model[1].parameters(), "weight_decay": 0.1},
        ],
        lr=0.01,
        weight_decay=0.01,
    )
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(optimizer, 1.0, 0.1, 5, 25),
            schedany.arbitrary_schedule_factory(
                optimizer,
                lambda o: StepLR(o, step_size=7, gamma=0.5),
                schedule_target="weight_decay",
            ),
            schedany.linear_schedule_with_inverse_warmup(
                optimizer, 1.0, 0.95, 4, 30, schedule_target="betas[0]"
            ),
            schedany.polynomial_schedule_with_warmup(
                optimizer,
                1.0,
                0.0,
                3,
                20,
                schedule_target="gradient_norm_threshold",
                default_value=2.0,
            ),
        ]
    )
    return model, optimizer, schedule


def train(
    stop: int,
    *,
    log_dir: Path | None = None,
    purge_step: int | None = None,
    controller: FakeController | None = None,
    stock_writer: bool = False,
    resume: dict | None = None,
    checkpoint_at: int | None = None,
) -> tuple[dict[str, dict[int, float]], dict | None]:
    """A small training loop, logging each optimizer step between optimizer.step() and
    schedule.step(). Returns what it should have logged, and the checkpoint taken
    before step ``checkpoint_at``."""
    model, optimizer, schedule = make_run()
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        start = resume["step"]
    logger = None
    if log_dir is not None and stock_writer:  # TensorBoard's own writer: the plain path
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        logger = ScheduleLogger(schedule, controller, writer=writer)
    elif log_dir is not None:  # the logger's own writer: the fast path
        logger = ScheduleLogger(schedule, controller, log_dir=str(log_dir), purge_step=purge_step)
        assert logger.tags == [f"schedule/{k}/{g}" for k in KEYS for g in GROUPS]
    expected: dict[str, dict[int, float]] = {}
    checkpoint = None
    for step in range(start, stop):
        if step == checkpoint_at:
            checkpoint = copy.deepcopy(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                }
            )
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if logger is not None:
            logger.log(step, {"train/loss": loss.item()})
        for key in KEYS:
            for group, value in zip(GROUPS, schedule.get_last_schedule(key)):
                expected.setdefault(f"schedule/{key}/{group}", {})[step] = value
        expected.setdefault("train/loss", {})[step] = loss.item()
        schedule.step()
    if logger is not None:
        logger.close()
        if stock_writer:
            writer.close()
    return expected, checkpoint


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("stock_writer", [False, True], ids=["log_dir", "writer"])
def test_every_key_and_group_logged_with_the_schedule_values(
    tmp_path: Path, stock_writer: bool
) -> None:
    """30 steps, 4 keys x 3 groups: exactly the expected tags, 30 points each, equal to
    get_last_schedule at each step."""
    expected, _ = train(
        30, log_dir=tmp_path, controller=FakeController(), stock_writer=stock_writer
    )
    scalars = read_scalars(tmp_path)

    schedule_tags = {f"schedule/{k}/{g}" for k in KEYS for g in GROUPS}
    assert set(scalars) == schedule_tags | {
        "control/grad_norm",
        "control/micro_steps",
        "train/loss",
    }
    for tag, by_step in expected.items():
        assert [s for s, _ in scalars[tag]] == list(range(30)), tag
        assert [v for _, v in scalars[tag]] == [f32(by_step[s]) for s in range(30)], tag
    # The schedules really move, so a logger that wrote stale values would fail above.
    assert len({v for _, v in scalars["schedule/lr/head"]}) > 10
    assert len({v for _, v in scalars["schedule/weight_decay/pg2"]}) == 5
    assert [v for _, v in scalars["control/grad_norm"]] == [f32(1.0 / (s + 1)) for s in range(30)]


def test_custom_scalars_layout_has_one_chart_per_key(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, _, schedule = make_run()
    with ScheduleLogger(schedule, log_dir=str(tmp_path)) as logger:
        logger.log(0)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tensor = acc.Tensors("custom_scalars__config__")[-1].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {
        "lr": ["^schedule/lr/"],
        "weight_decay": ["^schedule/weight_decay/"],
        "betas[0]": [r"^schedule/betas\[0\]/"],
        "gradient_norm_threshold": ["^schedule/gradient_norm_threshold/"],
    }


def test_resume_with_purge_step_gives_one_continuous_curve(tmp_path: Path) -> None:
    """Checkpoint at 15, the first run goes on to 20 and dies; the resumed run reopens
    the same log dir at 15: steps 0..29 each exactly once, the uninterrupted values."""
    reference, _ = train(30)
    for purge in (True, False):
        log_dir = tmp_path / f"purge_{purge}"
        _, checkpoint = train(20, log_dir=log_dir, checkpoint_at=15)
        train(30, log_dir=log_dir, resume=checkpoint, purge_step=15 if purge else None)
        assert len(event_files(log_dir)) == 2
        scalars = read_scalars(log_dir)
        assert set(scalars) == set(reference)
        if not purge:  # without purge_step steps 15..19 appear twice: the checks below can fail
            assert [s for s, _ in scalars["schedule/lr/pg0"]] == [*range(20), *range(15, 30)]
            continue
        for tag, by_step in reference.items():
            assert [s for s, _ in scalars[tag]] == list(range(30)), tag
            assert [v for _, v in scalars[tag]] == [f32(by_step[s]) for s in range(30)], tag


def test_every_n_steps_and_log_scalars(tmp_path: Path) -> None:
    _, _, schedule = make_run()
    with ScheduleLogger(schedule, log_dir=str(tmp_path), every_n_steps=4) as logger:
        for step in range(10):
            logger.log(step, {"train/loss": float(step)})
            if step == 5:
                logger.log_scalars(step, {"eval/loss": 0.5})
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["schedule/lr/head"]] == [0, 4, 8]
    assert [s for s, _ in scalars["train/loss"]] == [0, 4, 8]
    assert scalars["eval/loss"] == [(5, 0.5)]


def test_writer_passed_in_stays_open(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    _, _, schedule = make_run()
    writer = SummaryWriter(str(tmp_path))
    with ScheduleLogger(schedule, writer=writer) as logger:
        logger.log(0)
    writer.add_scalar("after/close", 1.0, 0)  # still usable
    writer.close()
    assert {"schedule/lr/pg0", "after/close"} <= set(read_scalars(tmp_path))


def test_a_single_torch_scheduler_is_logged_as_lr(tmp_path: Path) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with ScheduleLogger(StepLR(optimizer, 1, 0.5), log_dir=str(tmp_path)) as logger:
        assert logger.tags == ["schedule/lr/pg0"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"every_n_steps": 0},
            ValueError,
            "ScheduleLogger requires every_n_steps to be an integer >= 1, got every_n_steps=0",
        ),
        (
            {"purge_step": -1},
            ValueError,
            "ScheduleLogger requires purge_step to be an integer >= 0, got purge_step=-1",
        ),
        ({"writer": object(), "log_dir": "x"}, ValueError, "either writer= or log_dir="),
        ({"controller": object()}, TypeError, "controller must have a metrics"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    _, _, schedule = make_run()
    with pytest.raises(error, match=match):
        ScheduleLogger(schedule, **kwargs)
    with pytest.raises(TypeError, match="SynchronousSchedule or a torch LRScheduler, got int"):
        ScheduleLogger(3)  # type: ignore[arg-type]


def test_duplicate_group_names_are_rejected(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD(
        [{"params": [params[0]], "name": "pg1"}, {"params": [params[1]]}], lr=0.1
    )
    schedule = schedany.SynchronousSchedule([StepLR(optimizer, 1)])
    with pytest.raises(
        ValueError, match=r"param_groups\[0\] and param_groups\[1\] both log as 'pg1'"
    ):
        ScheduleLogger(schedule, log_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_hparams_join_the_run_of_their_folder(tmp_path: Path) -> None:
    """write_hparams adds the HParams to the run already in its folder (no sub-run),
    each value as the type an HParams column holds."""
    import numpy as np
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    _, _, schedule = make_run()
    with ScheduleLogger(schedule, log_dir=str(tmp_path / "run")) as logger:
        logger.log_scalars(3, {"eval/loss": 0.5})
    values = {"a.b": 3, "name": "x", "flag": True, "pair": [1, 2], "np": np.float64(0.25)}
    write_hparams(tmp_path / "run", values, ["eval/loss"])
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    runs.Reload()
    assert list(runs.Runs()) == ["run"]
    content = runs.PluginRunToTagToContent(metadata.PLUGIN_NAME)["run"]
    summary = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [h.name for h in summary.hparam_infos] == list(values)
    assert [m.name.tag for m in summary.metric_infos] == ["eval/loss"]
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG]
    ).hparams
    assert start["a.b"].number_value == 3.0 and start["np"].number_value == 0.25
    assert start["name"].string_value == "x" and start["flag"].bool_value is True
    assert start["pair"].string_value == "[1, 2]"
    assert runs.Scalars("run", "eval/loss")[-1].value == 0.5


@pytest.mark.slow
def test_import_schedany_does_not_import_tensorboard() -> None:
    code = "import sys, schedany; assert 'tensorboard' not in sys.modules, 'tensorboard imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _rank_worker(rank: int, world_size: int, init_file: str, root: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        _, _, schedule = make_run()
        shared = ScheduleLogger(schedule, log_dir=os.path.join(root, "shared"))
        own = ScheduleLogger(schedule, FakeController(), log_dir=os.path.join(root, f"rank{rank}"))
        assert shared.enabled == own.enabled == (rank == 0)
        for step in range(3):
            shared.log(step, {"train/loss": 1.0})
            own.log(step, {"train/loss": 1.0})
            schedule.step()
        shared.close()
        own.close()
        write_hparams(os.path.join(root, f"hparams{rank}"), {"x": 1}, ["train/loss"])
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_only_rank_zero_writes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert len(event_files(tmp_path / "shared")) == 1
    assert len(event_files(tmp_path / "rank0")) == 1
    assert not (tmp_path / "rank1").exists()  # rank 1 never touched the file system
    assert len(event_files(tmp_path / "hparams0")) == 1
    assert not (tmp_path / "hparams1").exists()
    assert len(read_scalars(tmp_path / "shared")["schedule/lr/head"]) == 3


@pytest.mark.parametrize("step", [0, 1, 127, 128, 2**40, -1])
def test_event_record_is_the_event_tensorboard_would_write(tmp_path: Path, step: int) -> None:
    """One write of the logger's own event file parses to the expected Event and frames
    exactly like TensorBoard's own RecordWriter (length, masked CRCs)."""
    import io

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    from schedany.integrations.tensorboard import _EventFile

    tags = [f"schedule/{k}/{g}" for k in KEYS for g in ["pg0", "h\u00e9ad", "pg2"]]
    values = torch.randn(len(tags), generator=torch.Generator().manual_seed(step % 97)).tolist()
    values[0] = float("nan")
    events = _EventFile(str(tmp_path), None)
    events.write_scalars(step, dict(zip(tags, values)), 1234.5)
    events.close()
    (path,) = event_files(tmp_path)
    raw = path.read_bytes()
    records, pos = [], 0
    while pos < len(raw):  # TFRecord framing: length, its CRC, data, its CRC
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        records.append(raw[pos + 12 : pos + 12 + length])
        pos += 16 + length
    data = records[-1]
    event = Event.FromString(data)
    assert (event.step, event.wall_time) == (step, 1234.5)
    assert [v.tag for v in event.summary.value] == tags
    assert math.isnan(event.summary.value[0].simple_value)
    assert [v.simple_value for v in event.summary.value][1:] == [f32(x) for x in values[1:]]

    theirs = io.BytesIO()
    RecordWriter(theirs).write(data)
    assert raw.endswith(theirs.getvalue())


TRAIN_CONFIG = """\
model: {d_model: 16, n_layers: 1, n_heads: 2, seq_len: 16}
data: {max_bytes: 65536, eval_windows: 4, eval_batch_size: 4}
optimizer: {name: AdamW, lr: 1.0e-3, weight_decay: 0.1, param_groups: {}}
extend: {gradient_norm_threshold: 2.0}
schedules:
  lr: {curve: cosine_annealing_with_warmup, warmup_to_value: 1.0, anneal_to_value: 0.1,
       num_warmup_steps: 3, num_training_steps: 10}
  weight_decay: {scheduler: StepLR, step_size: 3, gamma: 0.5}
  gradient_norm_threshold: {curve: linear_schedule_with_warmup, warmup_to_value: 1.0,
                            anneal_to_value: 0.5, num_warmup_steps: 2, num_training_steps: 10}
train: {steps: 10, micro_batch_size: 2, log_every: 1, checkpoint_every: 4, progress: none}
"""


def test_reference_trainer_resume_gives_one_continuous_curve(tmp_path: Path) -> None:
    """The real trainer: a run that got to step 6 but whose last checkpoint is step 4
    resumes there; its log dir then holds steps 1..10 once each, as an uninterrupted run's."""
    from schedany.config import load_config
    from schedany.job import checkpoint
    from schedany.job.trainer import train as run_job

    (tmp_path / "config.yaml").write_text(TRAIN_CONFIG)

    def job(name: str, *overrides: str) -> None:
        where = [
            f"train.log_dir={tmp_path / name}",
            f"train.checkpoint_dir={tmp_path / name / 'ckpt'}",
        ]
        run_job(load_config(tmp_path / "config.yaml", [*where, *overrides]))

    job("full")
    job("resumed", "train.steps=6")
    newest = checkpoint.list_checkpoints(tmp_path / "resumed" / "ckpt")[0]
    assert newest.step == 6
    shutil.rmtree(newest.path)  # as if the process died after logging step 6, before saving it
    job("resumed")
    full, resumed = read_scalars(tmp_path / "full"), read_scalars(tmp_path / "resumed")
    assert len(event_files(tmp_path / "resumed")) == 2
    assert set(resumed) == set(full) and {"schedule/lr/decay", "train/loss", "eval/loss"} <= set(
        full
    )
    for tag in full:
        if tag != "eval/loss":
            assert [s for s, _ in resumed[tag]] == list(range(1, 11)), tag
        assert resumed[tag] == full[tag], tag
