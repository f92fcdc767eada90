"""``schedany preview``: the plot, the table, and agreement with what a real run logs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    SCALARS,
    EventAccumulator,
)

from schedany.cli import main  # noqa: E402
from schedany.config import ConfigError, load_config  # noqa: E402
from schedany.preview import (  # noqa: E402
    DPI,
    format_table,
    plot_trace,
    preview_command,
    table_steps,
    trace,
)

STEPS = 12
KEYS = ["lr", "weight_decay", "betas[0]", "gradient_norm_threshold"]
GROUPS = ["decay", "no_decay"]

CONFIG = """\
seed: 0
model: {d_model: 16, n_layers: 1, n_heads: 2, seq_len: 16}
data: {max_bytes: 65536, eval_windows: 4, eval_batch_size: 4}
optimizer:
  name: AdamW
  lr: 1.0e-3
  weight_decay: 0.1
  betas: [0.9, 0.95]
  param_groups: {no_decay: {weight_decay: 0.0}}
extend:
  gradient_norm_threshold: 2.0
schedules:
  lr: {curve: cosine_annealing_with_warmup, warmup_to_value: 1.0, anneal_to_value: 0.1,
       num_warmup_steps: 3, num_training_steps: 12}
  weight_decay: {scheduler: StepLR, step_size: 4, gamma: 0.5}
  betas[0]: {curve: linear_schedule_with_inverse_warmup, warmup_to_value: 1.0,
             anneal_to_value: 0.9, num_warmup_steps: 2, num_training_steps: 12,
             warmup_multiplier: 1.1}
  gradient_norm_threshold: {curve: polynomial_schedule_with_warmup, warmup_to_value: 1.0,
                            anneal_to_value: 0.25, num_warmup_steps: 4, num_training_steps: 10}
train:
  steps: 12
  micro_batch_size: 2
  log_every: 4
  progress: none
"""


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def parse_table(text: str) -> tuple[list[str], dict[int, list[float]]]:
    lines = [line.split() for line in text.splitlines()[1:]]  # first line: what it shows
    header, rows = lines[0], lines[1:]
    assert header[0] == "step"
    return header[1:], {int(r[0]): [float(v) for v in r[1:]] for r in rows}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference trainer on the test config: its TensorBoard events and metrics.jsonl."""
    from schedany.job.trainer import train

    root = tmp_path_factory.mktemp("real_run")
    (root / "config.yaml").write_text(CONFIG)
    config = load_config(root / "config.yaml", [f"train.log_dir={root / 'logs'}"])
    train(config)
    return root / "logs"


def test_table_equals_what_a_real_run_logs(config_file: Path, real_run: Path, capsys) -> None:
    """Every number of the table is the value the trainer logged at that step."""
    assert preview_command(str(config_file), None, None, None, []) == 0
    columns, rows = parse_table(capsys.readouterr().out)
    assert columns == [f"{k}/{g}" for k in KEYS for g in GROUPS]
    assert list(rows) == list(range(1, STEPS + 1))
    logged = scalars(real_run)
    for c, column in enumerate(columns):
        by_step = dict(logged[f"schedule/{column}"])
        assert sorted(by_step) == list(range(1, STEPS + 1)), column
        for step, values in rows.items():
            assert values[c] == pytest.approx(by_step[step], rel=1e-5, abs=1e-12), (column, step)


def test_trace_is_exactly_the_trainers_values(config_file: Path, real_run: Path) -> None:
    """Bit for bit: float64 against metrics.jsonl, float32 against the event file."""
    result = trace(load_config(config_file))
    assert result.groups == GROUPS and list(result.values) == KEYS
    records = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        for key in KEYS:
            assert record["schedule"][key] == result.values[key][record["step"] - 1], key
    logged = scalars(real_run)
    for key in KEYS:
        for g, group in enumerate(GROUPS):
            assert logged[f"schedule/{key}/{group}"] == [
                (s, f32(result.values[key][s - 1][g])) for s in range(1, STEPS + 1)
            ]
    # Every key really moves over the run, so an off-by-one step would show.
    for key in KEYS:
        assert len({row[0] for row in result.values[key]}) > 2, key


def test_tensorboard_output_matches_the_real_run(
    config_file: Path, real_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tb"
    assert preview_command(str(config_file), None, None, str(out), []) == 0
    previewed, logged = scalars(out), scalars(real_run)
    schedule_tags = {t for t in logged if t.startswith("schedule/")}
    assert set(previewed) == schedule_tags == {f"schedule/{k}/{g}" for k in KEYS for g in GROUPS}
    for tag in schedule_tags:
        assert previewed[tag] == logged[tag], tag
    # Previewing again into the same folder replaces the curves instead of doubling them.
    assert preview_command(str(config_file), None, 5, str(out), []) == 0
    assert [s for s, _ in scalars(out)["schedule/lr/decay"]] == [1, 2, 3, 4, 5]


def test_png_has_one_panel_per_key(config_file: Path, tmp_path: Path, capsys) -> None:
    import matplotlib.image

    png = tmp_path / "plots" / "x.png"
    assert preview_command(str(config_file), str(png), None, None, []) == 0
    assert (
        "4 panels: lr, weight_decay, betas[0], gradient_norm_threshold" in capsys.readouterr().out
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    # 8 in wide, 0.9 in + 2 in per panel high, at 100 dpi: the size counts the panels.
    assert image.shape[:2] == (round((0.9 + 2.0 * 4) * DPI), 8 * DPI)
    assert image[..., :3].std() > 0.05  # not a blank canvas

    fig = plot_trace(trace(load_config(config_file)))
    assert [ax.get_title(loc="left") for ax in fig.axes] == KEYS
    assert all(len(ax.get_lines()) == len(GROUPS) for ax in fig.axes)


def test_steps_and_overrides(config_file: Path, capsys) -> None:
    assert preview_command(str(config_file), None, 40, None, ["optimizer.lr=0.5"]) == 0
    columns, rows = parse_table(capsys.readouterr().out)
    assert list(rows) == table_steps(40) and rows.keys() >= {1, 40} and len(rows) == 21
    result = trace(load_config(config_file, ["optimizer.lr=0.5"]), 40)
    assert rows[40][0] == pytest.approx(result.values["lr"][39][0], rel=1e-5)
    assert max(row[0] for row in result.values["lr"]) == 0.5  # the override took effect


def test_bad_arguments_are_config_errors(config_file: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--output: expected a file ending in \.png .*got '.*x\.txt'"
    ):
        preview_command(str(config_file), str(tmp_path / "x.txt"), None, None, [])
    with pytest.raises(ConfigError, match=r"--steps: expected an integer >= 1, got 0"):
        preview_command(str(config_file), None, 0, None, [])
    with pytest.raises(ConfigError, match=r"schedules\.lr\.num_warmup_steps"):
        preview_command(str(config_file), None, None, None, ["schedules.lr.num_warmup_steps=-5"])
    assert not any(p.name == "x.txt" for p in tmp_path.iterdir())


def test_cli(config_file: Path, tmp_path: Path, capsys) -> None:
    assert main(["preview", str(config_file), "--steps", "3"]) == 0
    assert format_table(trace(load_config(config_file), 3)) in capsys.readouterr().out
    assert main(["preview", str(config_file), "--set", "schedules.lr.curve=nope"]) == 2
    assert "schedules.lr" in capsys.readouterr().err
    assert main(["preview", str(config_file), "-o", str(tmp_path / "p.png"), "--steps", "5"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
