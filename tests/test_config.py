"""Schedule specs and train configs: what they build, and every way they are refused.

Invariant: a spec builds exactly the schedule its Python spelling builds, and every
mistake is a ConfigError naming the dotted path, the value and what was expected,
with the optimizer left as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import schedany
from schedany.config import (
    ConfigError,
    build_schedule,
    config_to_dict,
    load_config,
    parse_config,
    register_curve,
    unregister_curve,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def adamw(**kwargs):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.AdamW(
        [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
        lr=1.0,
        weight_decay=0.1,
        **kwargs,
    )


def trace(optimizer, schedule, names, steps=12):
    out = []
    for _ in range(steps):
        out.append({n: schedule.get_last_schedule(n) for n in names})
        optimizer.step()
        schedule.step()
    return out


COSINE = {
    "curve": "cosine_annealing_with_warmup",
    "warmup_to_value": 1.0,
    "anneal_to_value": 0.1,
    "num_warmup_steps": 3,
    "num_training_steps": 10,
}


def test_spec_builds_the_same_values_as_the_python_spelling():
    spec = {
        "extend": {"gradient_norm_threshold": 2.0},
        "schedules": {
            "lr": COSINE,
            "weight_decay": {"scheduler": "StepLR", "step_size": 2, "gamma": 0.5},
            "betas[0]": {"curve": "constant_schedule", "value": 0.5},
            "gradient_norm_threshold": {
                "curve": "cosine_annealing_with_inverse_warmup",
                "warmup_to_value": 1.0,
                "anneal_to_value": 0.5,
                "num_warmup_steps": 2,
                "num_training_steps": 8,
            },
        },
    }
    opt_a = adamw()
    got = build_schedule(opt_a, spec)
    assert isinstance(got, schedany.SynchronousSchedule)
    assert got.schedule_names == ["lr", "weight_decay", "betas[0]", "gradient_norm_threshold"]

    opt_b = adamw()
    schedany.extend_optimizer(opt_b, "gradient_norm_threshold", 2.0)
    args = {k: v for k, v in COSINE.items() if k != "curve"}
    want = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(opt_b, **args),
            schedany.arbitrary_schedule_factory(
                opt_b,
                lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
                schedule_target="weight_decay",
            ),
            schedany.constant_schedule(opt_b, 0.5, schedule_target="betas[0]"),
            schedany.cosine_annealing_with_inverse_warmup(
                opt_b, 1.0, 0.5, 2, 8, schedule_target="gradient_norm_threshold"
            ),
        ]
    )
    names = got.schedule_names
    assert trace(opt_a, got, names) == trace(opt_b, want, names)


def test_spec_from_a_yaml_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("schedules:\n  weight_decay: {scheduler: ExponentialLR, gamma: 0.5}\n")
    opt = adamw()
    schedule = build_schedule(opt, path)
    opt.step()
    schedule.step()
    assert schedule.get_last_schedule("weight_decay") == [0.05, 0.0]


WSD = {
    "curve": "warmup_stable_decay",
    "warmup_to_value": 1.0,
    "anneal_to_value": 0.1,
    "num_warmup_steps": 2,
    "num_training_steps": 9,
    "num_decay_steps": 4,
}


def test_warmup_stable_decay_from_a_yaml_file_is_the_python_spelling(tmp_path):
    """A built-in is usable from a file by its name, on lr and on any other key."""
    path = tmp_path / "wsd.yaml"
    path.write_text(
        "schedules:\n"
        "  lr: {curve: warmup_stable_decay, warmup_to_value: 1.0, anneal_to_value: 0.1,\n"
        "       num_warmup_steps: 2, num_training_steps: 9, num_decay_steps: 4}\n"
        "  weight_decay: {curve: warmup_stable_decay, warmup_to_value: 1.0,\n"
        "                 anneal_to_value: 0.5, num_warmup_steps: 0, num_training_steps: 9,\n"
        "                 num_decay_steps: 3, decay_shape: sqrt}\n"
    )
    opt_a = adamw()
    got = build_schedule(opt_a, path)
    opt_b = adamw()
    want = schedany.SynchronousSchedule(
        [
            schedany.warmup_stable_decay(opt_b, 1.0, 0.1, 2, 9, 4),
            schedany.warmup_stable_decay(
                opt_b, 1.0, 0.5, 0, 9, 3, "sqrt", schedule_target="weight_decay"
            ),
        ]
    )
    names = ["lr", "weight_decay"]
    assert got.schedule_names == names
    traced = trace(opt_a, got, names)
    assert traced == trace(opt_b, want, names)
    # lr starts at 1.0, so it is λ(t): warmup to t = 2, stable to S = 9 - 4, linear decay
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1]
    assert [v["lr"][0] for v in traced] == pytest.approx(expected, rel=0, abs=1e-12)


def test_registered_curve_is_usable_and_its_arguments_checked():
    register_curve("halving", lambda every: lambda t: 0.5 ** (t // every))
    try:
        opt = adamw()
        schedule = build_schedule(opt, {"schedules": {"lr": {"curve": "halving", "every": 2}}})
        values = [v["lr"][0] for v in trace(opt, schedule, ["lr"], 6)]
        assert values == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        with pytest.raises(ConfigError, match=r"^schedules\.lr\.evry: unknown argument"):
            build_schedule(adamw(), {"schedules": {"lr": {"curve": "halving", "evry": 2}}})
        with pytest.raises(ConfigError, match=r"^schedules\.lr\.every: required"):
            build_schedule(adamw(), {"schedules": {"lr": {"curve": "halving"}}})
        with pytest.raises(ValueError, match="already registered"):
            register_curve("halving", lambda: lambda t: 1.0)
        with pytest.raises(ValueError, match="built-in"):
            register_curve("constant_schedule", lambda: lambda t: 1.0)
    finally:
        unregister_curve("halving")
    with pytest.raises(
        ConfigError, match=r"^schedules\.lr\.curve: expected a built-in or registered"
    ):
        build_schedule(adamw(), {"schedules": {"lr": {"curve": "halving", "every": 2}}})


def test_the_message_of_the_spec():
    spec = {"schedules": {"lr": {**COSINE, "num_warmup_steps": -5}}}
    with pytest.raises(ConfigError) as info:
        build_schedule(adamw(), spec)
    assert str(info.value) == "schedules.lr.num_warmup_steps: expected an integer >= 0, got -5"
    assert info.value.path == "schedules.lr.num_warmup_steps"


BAD_SPECS = [
    ({"schedules": {}}, r"^schedules: expected at least one schedule"),
    ({"schedule": {"lr": COSINE}}, r"^schedule: unknown block \(did you mean 'schedules'\?\)"),
    (
        {"schedules": {"lr": {**COSINE, "num_training_steps": 2}}},
        r"^schedules\.lr\.num_training_steps: expected an integer >= num_warmup_steps \(3\), got 2",
    ),
    (
        {"schedules": {"lr": {**COSINE, "warmup_to_value": "high"}}},
        r"^schedules\.lr\.warmup_to_value: expected a finite number, got 'high'",
    ),
    (
        {"schedules": {"lr": {**COSINE, "num_warmup_steps": 2.5}}},
        r"^schedules\.lr\.num_warmup_steps: expected an integer >= 0, got 2\.5",
    ),
    (
        {"schedules": {"lr": {**COSINE, "curve": "cosine_with_warmup"}}},
        r"^schedules\.lr\.curve: expected a built-in or registered curve",
    ),
    (
        {"schedules": {"lr": {"scheduler": "StepLr", "step_size": 2}}},
        r"^schedules\.lr\.scheduler: .*did you mean 'StepLR'",
    ),
    (
        {"schedules": {"lr": {"scheduler": "LambdaLR"}}},
        r"^schedules\.lr\.scheduler: LambdaLR cannot be built from a config.*register_curve",
    ),
    (
        {"schedules": {"lr": {"scheduler": "StepLR"}}},
        r"^schedules\.lr\.step_size: required by torch\.optim\.lr_scheduler\.StepLR but missing",
    ),
    (
        {"schedules": {"lr": {"scheduler": "StepLR", "step_size": 2, "optimizer": 1}}},
        r"^schedules\.lr\.optimizer: is set by schedany, not by the spec",
    ),
    (
        {"schedules": {"lr": {**COSINE, "schedule_target": "momentum"}}},
        r"^schedules\.lr\.schedule_target: is set by schedany",
    ),
    (
        {"schedules": {"lr": {**COSINE, "scheduler": "StepLR"}}},
        r"^schedules\.lr: expected exactly one of `curve:`",
    ),
    ({"schedules": {"lr": 0.1}}, r"^schedules\.lr: expected a mapping with `curve:`"),
    (
        {"schedules": {"momentum": {"curve": "constant_schedule", "value": 1.0}}},
        r"^schedules\.momentum: param_groups\[0\] has no key 'momentum'.*under `extend:`",
    ),
    (
        {"schedules": {"betas[5]": {"curve": "constant_schedule", "value": 1.0}}},
        r"^schedules\.betas\[5\]: index 5 is out of range",
    ),
    (
        {"schedules": {"betas[x]": {"curve": "constant_schedule", "value": 1.0}}},
        r"^schedules\.betas\[x\]: is malformed; write one element",
    ),
    (
        {"schedules": {"lr": {"scheduler": "OneCycleLR", "max_lr": 1.0, "total_steps": 10}}},
        r"^schedules\.lr: momentum cycling.*cycle_momentum=False",
    ),
    (
        {"schedules": {"lr": {"scheduler": "StepLR", "step_size": 2, "gamma": "x"}}},
        r"^schedules\.lr\.gamma: expected a finite number, got 'x'",
    ),
    (
        {"schedules": {"lr": {"scheduler": "MultiStepLR", "milestones": [2, 2.5]}}},
        r"^schedules\.lr\.milestones\[1\]: expected an integer, got 2\.5",
    ),
    (
        {
            "schedules": {
                "lr": {
                    "scheduler": "OneCycleLR",
                    "max_lr": 1.0,
                    "total_steps": 10,
                    "anneal_strategy": "cosine",
                }
            }
        },
        r"^schedules\.lr\.anneal_strategy: expected one of cos, linear, got 'cosine'",
    ),
    (
        {"extend": {"weight_decay": 0.5}, "schedules": {"lr": COSINE}},
        r"^extend\.weight_decay: the optimizer already has this key",
    ),
    (
        {"extend": {"threshold": "big"}, "schedules": {"lr": COSINE}},
        r"^extend\.threshold: expected a finite number, got 'big'",
    ),
    (
        {"extend": {"threshold": True}, "schedules": {"lr": COSINE}},
        r"^extend\.threshold: expected a finite number, got true",
    ),
    (
        {"extend": [1], "schedules": {"lr": COSINE}},
        r"^extend: expected a mapping of new optimizer key",
    ),
    (
        {"schedules": {"lr": {**COSINE, "polynomial_exponent": 2.0}}},
        r"^schedules\.lr\.polynomial_exponent: unknown argument of curve",
    ),
    (
        {
            "schedules": {
                "lr": {
                    "curve": "polynomial_schedule_with_warmup",
                    **{k: v for k, v in COSINE.items() if k != "curve"},
                    "polynomial_exponent": 0,
                }
            }
        },
        r"^schedules\.lr\.polynomial_exponent: expected a finite number > 0, got 0",
    ),
    (
        {"schedules": {"lr": {**WSD, "num_decay_steps": 8}}},
        r"^schedules\.lr\.num_decay_steps: expected an integer <= num_training_steps - "
        r"num_warmup_steps \(7\), got 8$",
    ),
    (
        {"schedules": {"lr": {**WSD, "num_decay_steps": -1}}},
        r"^schedules\.lr\.num_decay_steps: expected an integer >= 0, got -1$",
    ),
    (
        {"schedules": {"weight_decay": {**WSD, "decay_shape": "exp"}}},
        r"^schedules\.weight_decay\.decay_shape: expected 'linear', 'cosine' or 'sqrt', "
        r"got 'exp'$",
    ),
    (
        {"schedules": {"lr": {k: v for k, v in WSD.items() if k != "num_decay_steps"}}},
        r"^schedules\.lr\.num_decay_steps: required by curve 'warmup_stable_decay' but missing",
    ),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_spec_is_a_config_error_and_leaves_the_optimizer_alone(spec, message):
    opt = adamw()
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ConfigError, match=message):
        build_schedule(opt, spec)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    assert not opt._optimizer_step_post_hooks  # no proxy left listening


def test_failed_spec_after_good_members_rolls_back_extend_and_hooks():
    opt = adamw()
    spec = {
        "extend": {"gnt": 1.0},
        "schedules": {
            "gnt": {"curve": "constant_schedule", "value": 2.0},
            "nope": {"curve": "constant_schedule", "value": 1.0},
        },
    }
    with pytest.raises(ConfigError, match=r"^schedules\.nope"):
        build_schedule(opt, spec)
    assert all("gnt" not in g for g in opt.param_groups) and "gnt" not in opt.defaults
    assert not opt._optimizer_step_post_hooks


# --- train configs -------------------------------------------------------------------


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
optimizer: {name: AdamW, lr: 1e-3, betas: [0.9, 0.95]}
schedules:
  lr: {curve: constant_with_warmup, warmup_to_value: 1.0, num_warmup_steps: 2}
"""


def test_load_config_with_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "train.steps=7",
            "optimizer.weight_decay=1e-2",
            "train.log_dir=null",
            "schedules.weight_decay.curve=constant_schedule",
            "schedules.weight_decay.value=0.5",
            "control.kind=logical_batch",
            "extend.logical_batch_size=64",
        ],
    )
    assert config.train.steps == 7
    assert config.optimizer.kwargs == {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}
    assert config.schedules["weight_decay"].args == {"value": 0.5}
    assert config.control_key() == "logical_batch_size"
    assert parse_config(config_to_dict(config)) == config


@pytest.mark.parametrize("name", ["baseline", "weight_decay", "logical_batch", "gnts"])
def test_example_configs_load(name):
    config = load_config(EXAMPLES / f"{name}.yaml")
    assert config.train.steps >= 50
    assert parse_config(config_to_dict(config)) == config


SCHED = MINIMAL.split("\n", 1)[1]  # MINIMAL without its optimizer line

BAD_CONFIGS = [
    (MINIMAL + "trainer: {steps: 3}\n", [], r"^trainer: unknown block \(did you mean 'train'\?\)"),
    (
        MINIMAL + "train: {stepz: 3}\n",
        [],
        r"^train\.stepz: unknown field \(did you mean 'steps'\?\)",
    ),
    (MINIMAL + "train: {steps: -1}\n", [], r"^train\.steps: expected an integer >= 1, got -1"),
    (MINIMAL + "train: {steps: ten}\n", [], r"^train\.steps: expected an integer >= 1, got 'ten'"),
    (MINIMAL + "train: [1, 2]\n", [], r"^train: expected a mapping, got a list"),
    (MINIMAL + "seed: -3\n", [], r"^seed: expected an integer >= 0, got -3"),
    (
        MINIMAL + "model: {n_heads: 5}\n",
        [],
        r"^model\.n_heads: expected a divisor of model\.d_model \(64\)",
    ),
    (MINIMAL + "data: {path: /no/such/folder}\n", [], r"^data\.path: expected an existing folder"),
    (
        MINIMAL + "data: {eval_fraction: 1.5}\n",
        [],
        r"^data\.eval_fraction: expected a number in \(0, 1\)",
    ),
    (
        MINIMAL + "distributed: {strategy: horovod}\n",
        [],
        r"^distributed\.strategy: expected one of auto, none, ddp, fsdp, got 'horovod'",
    ),
    (
        MINIMAL + "control: {kind: gnts}\n",
        [],
        r"^control\.key: control\.kind gnts reads optimizer key 'gradient_norm_threshold'.*extend",
    ),
    (
        MINIMAL + "control: {kind: logical_batch, max_accumulation_steps: 3}\n"
        "extend: {logical_batch_size: 8}\n",
        [],
        r"^control\.max_accumulation_steps: only applies to kind gnts",
    ),
    (
        SCHED + "optimizer: {name: Adamw}\n",
        [],
        r"^optimizer\.name: expected a class of torch\.optim \(did you mean 'AdamW'\?\)",
    ),
    (
        SCHED + "optimizer: {name: AdamW, momentum: 0.9}\n",
        [],
        r"^optimizer\.momentum: unknown argument of torch\.optim\.AdamW",
    ),
    (
        SCHED + "optimizer: {lr: -1}\n",
        [],
        r"^optimizer\.lr: expected a finite number >= 0\.0, got -1",
    ),
    (
        SCHED + "optimizer: {betas: [0.9, 1.5]}\n",
        [],
        r"^optimizer\.betas\[1\]: expected a number in \[0, 1\)",
    ),
    (
        SCHED + "optimizer: {param_groups: {bias: {}}}\n",
        [],
        r"^optimizer\.param_groups\.bias: unknown param group",
    ),
    (SCHED + "optimizer: {name: LBFGS}\n", [], r"^optimizer\.name: LBFGS needs a closure"),
    (
        "x: !!python/object/apply:os.system ['echo hi']\n",
        [],
        r"refused YAML tag tag:yaml.org,2002:python/object/apply:os.system",
    ),
    ("train: {steps: 3\n", [], r"invalid YAML \(line \d+, column \d+\)"),
    (MINIMAL + "train: {steps: 3}\ntrain: {steps: 4}\n", [], r"duplicate key 'train'"),
    ("- 1\n- 2\n", [], r"expected a mapping of blocks, got a list"),
    (MINIMAL, ["train.steps"], r"^--set train\.steps: expected KEY=VALUE"),
    (MINIMAL, ["train..steps=3"], r"^--set train\.\.steps=3: expected KEY=VALUE"),
    (MINIMAL + "seed: 0\n", ["seed.value=3"], r"^seed: is 0, not a mapping"),
    (MINIMAL, ["train.steps=[1"], r"^--set train\.steps=\[1: invalid YAML"),
    (
        MINIMAL,
        ["schedules.lr.num_warmup_steps=-5"],
        r"^schedules\.lr\.num_warmup_steps: expected an integer >= 0, got -5",
    ),
]


@pytest.mark.parametrize("text, overrides, message", BAD_CONFIGS)
def test_bad_config_is_a_config_error(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_reduce_lr_on_plateau_is_refused_by_the_job(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(
        ConfigError, match=r"^schedules\.lr\.scheduler: ReduceLROnPlateau needs a metric"
    ):
        load_config(path, ["schedules.lr={scheduler: ReduceLROnPlateau}"])


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"is a folder"):
        load_config(tmp_path)


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["optimizer.eps=1e-8", "train.steps=5"])
    assert config.optimizer.kwargs["lr"] == 1e-3 and config.optimizer.kwargs["eps"] == 1e-8
