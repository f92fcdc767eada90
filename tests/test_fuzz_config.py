"""Fuzzed configs, ``--set`` overrides and sweep files never get a traceback.

Invariant (docs/operations.md, "What survives which fault"): whatever the file or the
override holds — mutated keys, wrong types, odd values, YAML oddities — ``schedany
validate`` and ``schedany train`` exit 0 or 2, never print a traceback, and on exit 2
write nothing; a sweep file is accepted or refused with a ``ConfigError``, before Ray.
Everything runs in-process through ``cli.main``; a handful of cases go through a real
``python -m schedany`` subprocess.
"""

from __future__ import annotations

import contextlib
import copy
import io
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from schedany.cli import main
from schedany.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"
SWEEPS = ROOT / "examples" / "sweeps"
BASES = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}
TINY = {
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 16},
    "data": {"max_bytes": 20000, "eval_windows": 2, "eval_batch_size": 2},
    "train": {"steps": 1, "micro_batch_size": 2, "progress": "none", "eval_every": 0},
}
"""Laid over every base before mutating: a valid config then trains in a fraction of a
second."""
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    # No "explain" phase: it traces every line of PyYAML, which is very slow.
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested mapping, branches included."""
    if not isinstance(data, dict):
        return []
    out = []
    for key, value in data.items():
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for block, fields in over.items():
        out.setdefault(block, {}).update(fields)
    return out


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "cosine_annealing_with_warmup",
            "StepLR",
            "AdamW",
            "lr",
            "betas[0]",
            "betas[9]",
            "tokens",
            "samples",
            "steps",
            "auto",
            "ddp",
            "fsdp",
            "gnts",
            "none",
            "1e-3",
            "nan",
            "cuda",
            "cuda:7",
            "/no/such/dir",
            "~",
            "0x10",
            "١٢",
            "\x00",
            "a.b",
            "[1, 2]",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-2, 2)), inner, max_size=3),
    ),
    max_leaves=6,
)
key_names = st.one_of(
    st.text(max_size=10),
    st.sampled_from(
        [
            "lr",
            "curve",
            "unit",
            "every",
            "scheduler",
            "kind",
            "steps",
            "tokens",
            "name",
            "params",
            "extend",
            "schedules",
            "betas[0]",
            "weight_decay",
            "param_groups",
            "timeout_minutes",
            "strategy",
            "__class__",
            "<<",
        ]
    ),
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """An example config (tiny), with up to four mutations: a value replaced, a key
    removed, added or renamed."""
    data = _merged(BASES[draw(st.sampled_from(sorted(BASES)))], TINY)
    for _ in range(draw(st.integers(0, 4))):
        paths = _paths(data)
        op = draw(st.sampled_from(["set", "delete", "add", "rename"]))
        path = draw(st.sampled_from(paths)) if paths else ("seed",)
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        if op == "set":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            parent.pop(path[-1], None)
        elif op == "add" and isinstance(parent.get(path[-1]), dict):
            parent[path[-1]][draw(key_names)] = draw(values)
        elif op == "rename":
            parent[draw(key_names)] = parent.pop(path[-1])
    return data


YAML_ODDITIES = [
    "",  # an empty file
    "- just\n- a list\n",
    "42\n",
    "seed: 1\nseed: 2\n",  # duplicate key
    "seed: !!python/object/apply:os.system ['true']\n",
    "seed: !custom 1\n",
    "optimizer: &o {name: AdamW}\nextend: *o\n",
    "base: &b {steps: 1}\ntrain:\n  <<: *b\n",
    "? [a, b]\n: 1\n",  # a complex (unhashable) key
    "train:\n\tsteps: 1\n",  # a tab
    "seed: 2001-01-01\n",  # a date
    "seed: !!binary aGVsbG8=\n",
    "seed: !!set {a, b}\n",
    "schedules: {lr: " + "[" * 200 + "]" * 200 + "}\n",  # deeper than any config
    "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\nschedules: *b\n",  # aliases, small
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"  # ... and 10**9 values once expanded
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "seed: *i\n",
    "%YAML 1.1\n---\nseed: 0\n...\n---\nseed: 1\n",  # two documents
    "'unterminated\n",
    "train: {steps: 1e3}\n",
    "train: {steps: .inf}\noptimizer: {lr: .nan}\n",
]


@st.composite
def config_texts(draw: st.DrawFn) -> str | bytes:
    data = draw(mutated())
    try:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # a mutation yaml cannot write (rare); use an oddity instead
        text = ""
    kind = draw(st.sampled_from(["plain", "plain", "plain", "append", "replace", "bytes"]))
    if kind == "append":
        return text + draw(st.sampled_from(YAML_ODDITIES))
    if kind == "replace":
        return draw(st.sampled_from(YAML_ODDITIES))
    if kind == "bytes":  # not UTF-8
        return text.encode() + b"\xff\xfe seed: \x80\n"
    return text


override_texts = st.one_of(
    st.builds(
        lambda path, value: f"{'.'.join(path)}={value}",
        st.lists(key_names.filter(lambda k: "=" not in k), min_size=1, max_size=4),
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(
                [
                    "1",
                    "-1",
                    "null",
                    "[0.9, 0.95]",
                    "{a: 1}",
                    "{",
                    "!!python/name:os.system",
                    "1e-3",
                    ".nan",
                    "0x1F",
                    "true",
                    "'x'",
                    "*alias",
                    "&a 1",
                ]
            ),
        ),
    ),
    st.sampled_from(["train.steps", "=1", ".a=1", "a..b=1", "train.=1", "seed.x=1", "x=1=2"]),
)


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusals (`--set -x`): usage, then one line
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _check(command: str, code: int, err: str) -> None:
    event(f"{command} exit {code}")  # --hypothesis-show-statistics: how many of each
    assert code in (0, 2), f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        lines = err.splitlines()
        if lines[0].startswith("usage: "):  # argparse's refusal
            lines = lines[-1:]
        assert len(lines) == 1 and lines[0].startswith(f"schedany {command}: error: "), err


def _write(folder: Path, text: str | bytes) -> Path:
    path = folder / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@settings(FUZZ, max_examples=150)
@given(text=config_texts(), overrides=st.lists(override_texts, max_size=3))
def test_validate_exits_0_or_2_without_a_traceback(text: str | bytes, overrides: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), text)
        before = _files(Path(tmp))
        code, out, err = _run_cli(
            ["validate", str(path), *(a for o in overrides for a in ("--set", o))]
        )
        _check("validate", code, err)
        assert _files(Path(tmp)) == before
        if code == 0:
            assert "valid" in out


def _small_enough_to_train(path: Path, overrides: list[str]) -> bool:
    """A valid mutated config whose model or data is large trains too slowly here; those
    are checked by ``validate`` only."""
    from schedany.config import load_config

    try:
        config = load_config(path, overrides)
    except ConfigError:
        return True  # train must refuse it the same way
    m, t = config.model, config.train
    return (
        m.d_model * m.n_layers <= 64
        and m.seq_len <= 64
        and t.micro_batch_size <= 8
        and config.data.max_bytes <= 50000
        and config.data.eval_windows <= 8
        and (t.steps or 0) <= 2
        and t.samples is None
        and t.tokens is None
        and (config.control.max_accumulation_steps or 8) <= 8
    )


@settings(FUZZ, max_examples=80)
@given(text=config_texts(), overrides=st.lists(override_texts, max_size=2))
def test_train_exits_0_or_2_and_writes_nothing_on_2(text: str | bytes, overrides: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = _write(root, text)
        # Outputs go under the temporary folder, whatever the mutations said.
        runs = [f"train.log_dir={root / 'logs'}", f"train.checkpoint_dir={root / 'ckpt'}"]
        overrides = [*overrides, *runs]
        if not _small_enough_to_train(path, overrides):
            event("too large to train here")
            return
        before = _files(root)
        code, _, err = _run_cli(["train", str(path), *(a for o in overrides for a in ("--set", o))])
        _check("train", code, err)
        if code == 2:
            assert _files(root) == before, "exit 2 wrote files"


@st.composite
def sweep_texts(draw: st.DrawFn) -> str:
    sweep = yaml.safe_load(
        (SWEEPS / draw(st.sampled_from(sorted(p.name for p in SWEEPS.glob("*.yaml"))))).read_text()
    )
    sweep["base"] = str(EXAMPLES / Path(sweep["base"]).name)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(sweep)
        path = draw(st.sampled_from(paths))
        parent = sweep
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["set", "delete", "add"]))
        if op == "set":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            parent.pop(path[-1], None)
        elif isinstance(parent.get(path[-1]), dict):
            parent[path[-1]][draw(key_names)] = draw(values)
    text = yaml.safe_dump(sweep, sort_keys=False, allow_unicode=True)
    if draw(st.booleans()):
        text += draw(st.sampled_from(YAML_ODDITIES))
    return text


@FUZZ
@given(text=sweep_texts())
def test_sweep_files_are_accepted_or_refused_with_the_path(text: str):
    from schedany.integrations._sweep import load_sweep

    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), text)
        try:
            load_sweep(path)
        except ConfigError:
            pass
        else:
            return
        # Refused: the command says so in one line, exit 2, before Ray starts.
        code, _, err = _run_cli(["tune", str(path)])
        _check("tune", code, err)
        assert code == 2


@pytest.mark.slow
def test_real_processes_exit_2_without_a_traceback(tmp_path):
    """A handful through ``python -m schedany``: what in-process calls cannot show (the
    interpreter's own recursion limit and encoding, the console script's exit code)."""
    tiny = yaml.safe_dump(_merged(BASES["gnts"], TINY))
    cases = [
        ("validate", "x: " + "[" * 3000 + "]" * 3000 + "\n", []),
        ("train", "seed: !!python/object/apply:os.system ['true']\n", []),
        ("train", b"\xff\xfe seed: \x80\n", []),
        ("train", tiny, ["optimizer.lr=.nan", "x=1=2"]),
    ]
    folders = [tmp_path / f"case{i}" for i in range(len(cases))]
    procs = []
    try:
        for folder, (command, text, overrides) in zip(folders, cases):
            folder.mkdir()
            path = _write(folder, text)
            sets = [a for o in overrides for a in ("--set", o)]
            procs.append(
                subprocess.Popen(  # all at once: each one spends its time importing
                    [sys.executable, "-m", "schedany", command, str(path), *sets],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for (command, _, _), proc in zip(cases, procs):
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 2, stderr
            lines = stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"schedany {command}: error: "), lines
    finally:
        for proc in procs:
            proc.kill()  # a no-op for those that exited
            proc.wait()
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
