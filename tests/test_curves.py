"""Every built-in follows its SPEC formula, checked against hand-computed tables.

The expected numbers below were computed once, outside the library, straight from
SPEC section 3 (50-digit mpmath, rounded to 17 significant digits); nothing here
calls schedany to produce an expected value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import schedany
from schedany.curves import (
    BUILTIN_CURVES,
    constant_curve,
    warmup_anneal_curve,
    warmup_stable_decay,
)

L, M = 10, 110
TS = (0, 1, L - 1, L, L + 1, (L + M) // 2, M - 1, M, M + 1, 2 * M)
TOL = 1e-12


@dataclass(frozen=True)
class Case:
    """One built-in: its arguments, the same curve as pure-curve arguments, and λ(TS)."""

    args: dict[str, Any]  # keyword arguments of the built-in (besides the optimizer)
    curve: dict[str, Any]  # the pure curve: warmup_anneal_curve(**curve), or constant_curve
    expected: tuple[float, ...]  # λ(t) for t in TS


def _anneal(W: float, A: float, anneal: str, warmup: str, **extra: float) -> dict[str, Any]:
    return dict(
        warmup_to_value=W,
        anneal_to_value=A,
        num_warmup_steps=L,
        num_training_steps=M,
        anneal=anneal,
        warmup=warmup,
        **extra,
    )


def _builtin_args(W: float, A: float, **extra: float) -> dict[str, Any]:
    return dict(
        warmup_to_value=W, anneal_to_value=A, num_warmup_steps=L, num_training_steps=M, **extra
    )


# t =                       0      1      L-1    L     L+1  (L+M)/2  M-1     M     M+1   2M
CASES: dict[str, Case] = {
    "cosine_annealing_with_warmup": Case(
        _builtin_args(0.8, 0.05),
        _anneal(0.8, 0.05, "cosine", "normal"),
        (0.0, 0.08, 0.72, 0.8, 0.79981496013714933, 0.425, 0.050185039862850666, 0.05, 0.05, 0.05),
    ),
    "cosine_annealing_with_inverse_warmup": Case(
        _builtin_args(0.6, 0.1, warmup_multiplier=5.0),
        _anneal(0.6, 0.1, "cosine", "inverse", warmup_multiplier=5.0),
        (3.0, 2.76, 0.84, 0.6, 0.59987664009143289, 0.35, 0.10012335990856711, 0.1, 0.1, 0.1),
    ),
    "polynomial_schedule_with_warmup": Case(
        _builtin_args(0.9, 0.2, polynomial_exponent=3.0),
        _anneal(0.9, 0.2, "polynomial", "normal", polynomial_exponent=3.0),
        (0.0, 0.09, 0.81, 0.9, 0.8792093, 0.2875, 0.2000007, 0.2, 0.2, 0.2),
    ),
    # P and R left at their defaults (2.0 and 20.0), so the defaults are pinned too.
    "polynomial_schedule_with_inverse_warmup": Case(
        _builtin_args(0.5, 0.02),
        _anneal(
            0.5, 0.02, "polynomial", "inverse", polynomial_exponent=2.0, warmup_multiplier=20.0
        ),
        (10.0, 9.05, 1.45, 0.5, 0.490448, 0.14, 0.020048, 0.02, 0.02, 0.02),
    ),
    "linear_schedule_with_warmup": Case(
        _builtin_args(0.7, 0.15),
        _anneal(0.7, 0.15, "polynomial", "normal", polynomial_exponent=1.0),
        (0.0, 0.07, 0.63, 0.7, 0.6945, 0.425, 0.1555, 0.15, 0.15, 0.15),
    ),
    "linear_schedule_with_inverse_warmup": Case(
        _builtin_args(0.4, 0.05, warmup_multiplier=4.0),
        _anneal(0.4, 0.05, "polynomial", "inverse", polynomial_exponent=1.0, warmup_multiplier=4.0),
        (1.6, 1.48, 0.52, 0.4, 0.3965, 0.225, 0.0535, 0.05, 0.05, 0.05),
    ),
    # A > W: the anneal climbs.
    "quadratic_schedule_with_warmup": Case(
        _builtin_args(0.3, 1.2),
        _anneal(0.3, 1.2, "polynomial", "normal", polynomial_exponent=2.0),
        (0.0, 0.03, 0.27, 0.3, 0.31791, 0.975, 1.19991, 1.2, 1.2, 1.2),
    ),
    "quadratic_schedule_with_inverse_warmup": Case(
        _builtin_args(0.75, 0.125),
        _anneal(
            0.75, 0.125, "polynomial", "inverse", polynomial_exponent=2.0, warmup_multiplier=20.0
        ),
        (15.0, 13.575, 2.175, 0.75, 0.7375625, 0.28125, 0.1250625, 0.125, 0.125, 0.125),
    ),
    "sqrt_schedule_with_warmup": Case(
        _builtin_args(0.4, 1.5),
        _anneal(0.4, 1.5, "polynomial", "normal", polynomial_exponent=0.5),
        (0.0, 0.04, 0.36, 0.4, 0.40551381918271805, 0.72218254069479772, 1.39, 1.5, 1.5, 1.5),
    ),
    "sqrt_schedule_with_inverse_warmup": Case(
        _builtin_args(0.65, 0.07, warmup_multiplier=2.5),
        _anneal(
            0.65, 0.07, "polynomial", "inverse", polynomial_exponent=0.5, warmup_multiplier=2.5
        ),
        (
            1.625,
            1.5275,
            0.7475,
            0.65,
            0.64709271352183957,
            0.48012193308819756,
            0.128,
            0.07,
            0.07,
            0.07,
        ),
    ),
    "constant_with_warmup": Case(
        dict(warmup_to_value=0.85, num_warmup_steps=L),
        dict(
            warmup_to_value=0.85,
            anneal_to_value=0.0,
            num_warmup_steps=L,
            num_training_steps=0,
            anneal="constant",
            warmup="normal",
        ),
        (0.0, 0.085, 0.765, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85),
    ),
    "constant_with_inverse_warmup": Case(
        dict(warmup_to_value=0.45, num_warmup_steps=L, warmup_multiplier=3.0),
        dict(
            warmup_to_value=0.45,
            anneal_to_value=0.0,
            num_warmup_steps=L,
            num_training_steps=0,
            anneal="constant",
            warmup="inverse",
            warmup_multiplier=3.0,
        ),
        (1.35, 1.26, 0.54, 0.45, 0.45, 0.45, 0.45, 0.45, 0.45, 0.45),
    ),
    "warmup_to_constant": Case(
        dict(warmup_to_value=0.55, num_warmup_steps=L),
        dict(
            warmup_to_value=0.55,
            anneal_to_value=0.0,
            num_warmup_steps=L,
            num_training_steps=0,
            anneal="constant",
            warmup="normal",
        ),
        (0.0, 0.055, 0.495, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55),
    ),
    "constant_schedule": Case(dict(value=0.35), dict(value=0.35), (0.35,) * len(TS)),
}

BUILTIN_NAMES = list(BUILTIN_CURVES)


def _pure_curve(name: str) -> Callable[[int], float]:
    case = CASES[name]
    if name == "constant_schedule":
        return constant_curve(**case.curve)
    return warmup_anneal_curve(**case.curve)


def test_every_builtin_has_a_table():
    assert sorted([*CASES, "warmup_stable_decay"]) == sorted(BUILTIN_NAMES)  # WSD: WSD_CASES
    assert len(BUILTIN_NAMES) == 15  # 14 built-ins + the warmup_to_constant alias


def test_tables_are_informative():
    """Values before the clamped tail are pairwise distinct, so an off-by-one in t, L
    or M, or a swapped W/A, cannot pass unnoticed."""
    for name, case in CASES.items():
        if "constant" in name:
            continue
        head = case.expected[:7]  # t = 0 .. M-1
        assert len(set(head)) == len(head), name


@pytest.mark.parametrize("name", list(CASES))
def test_pure_curve_matches_table(name: str):
    curve = _pure_curve(name)
    got = [curve(t) for t in TS]
    assert got == pytest.approx(list(CASES[name].expected), rel=0, abs=TOL)


# Two groups with different initial values; one schedule on weight_decay and one on
# betas[0] of the same AdamW. Its params get no grad, so optimizer.step() is a no-op
# that still marks the step for torch's step-order check.
INITIAL_WD = (0.3, 0.02)
INITIAL_BETA1 = (0.7, 0.95)
BETA2 = (0.999, 0.98)


def _optimizer() -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": wd, "betas": (b1, b2)}
            for wd, b1, b2 in zip(INITIAL_WD, INITIAL_BETA1, BETA2)
        ]
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bound_schedule_matches_table(name: str):
    _assert_bound_matches(name, CASES[name].args, dict(zip(TS, CASES[name].expected)))


def _assert_bound_matches(name: str, args: dict[str, Any], expected: dict[int, float]) -> None:
    """The built-in ``name`` on weight_decay and on betas[0] is initial × λ(t) at every
    ``t`` of ``expected``, in both groups."""
    builtin = getattr(schedany, name)
    optimizer = _optimizer()
    on_wd = builtin(optimizer, **args, schedule_target="weight_decay")
    on_beta1 = builtin(optimizer, **args, schedule_target="betas[0]")
    assert isinstance(on_wd, torch.optim.lr_scheduler.LambdaLR)

    for t in range(max(TS) + 1):
        if t in expected:
            lam = expected[t]
            groups = optimizer.param_groups
            assert [g["weight_decay"] for g in groups] == pytest.approx(
                [v * lam for v in INITIAL_WD], rel=0, abs=TOL
            ), f"weight_decay at t={t}"
            assert [g["betas"][0] for g in groups] == pytest.approx(
                [v * lam for v in INITIAL_BETA1], rel=0, abs=TOL
            ), f"betas[0] at t={t}"
            assert [g["betas"][1] for g in groups] == list(BETA2)  # the other element untouched
            assert all(type(g["betas"]) is tuple for g in groups)
            assert on_wd.get_last_lr() == [g["weight_decay"] for g in groups]
        optimizer.step()
        on_wd.step()
        on_beta1.step()


def test_warmup_to_constant_is_constant_with_warmup():
    assert schedany.warmup_to_constant is schedany.constant_with_warmup


def test_equal_warmup_and_training_steps_jumps_straight_to_A():
    """p = 1 when M = L: no anneal phase, λ(L) = A."""
    curve = warmup_anneal_curve(
        warmup_to_value=0.8, anneal_to_value=0.1, num_warmup_steps=4, num_training_steps=4
    )
    assert [curve(t) for t in range(7)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.1, 0.1, 0.1], rel=0, abs=TOL
    )


def test_no_warmup_starts_at_W():
    curve = warmup_anneal_curve(
        warmup_to_value=0.8,
        anneal_to_value=0.2,
        num_warmup_steps=0,
        num_training_steps=4,
        anneal="polynomial",
        polynomial_exponent=1.0,
    )
    assert [curve(t) for t in range(6)] == pytest.approx(
        [0.8, 0.65, 0.5, 0.35, 0.2, 0.2], rel=0, abs=TOL
    )


# ---- warmup_stable_decay ------------------------------------------------------------

# L = 10, M = 110 as above, D = 40: the decay starts at S = 70. Same mpmath recipe.
D = 40
S = M - D
WSD_TS = (0, 1, L - 1, L, L + 1, S - 1, S, S + 1, S + D // 4, S + D // 2, M - 1, M, M + 1, 2 * M)

# decay_shape -> (W, A, λ(WSD_TS))
WSD_CASES: dict[str, tuple[float, float, tuple[float, ...]]] = {
    "linear": (
        0.9,
        0.03,
        (0.0, 0.09, 0.81, 0.9, 0.9, 0.9, 0.9, 0.87825, 0.6825, 0.465, 0.05175, 0.03, 0.03, 0.03),
    ),
    "cosine": (
        0.6,
        0.05,
        (
            *(0.0, 0.06, 0.54, 0.6, 0.6, 0.6, 0.6),
            *(0.59915226677661019, 0.51945436482630057, 0.325, 0.050847733223389807),
            *(0.05, 0.05, 0.05),
        ),
    ),
    # A > W: the decay climbs; 1 - sqrt(p), so λ(S + D/4) is exactly halfway.
    "sqrt": (
        0.35,
        0.8,
        (
            *(0.0, 0.035, 0.315, 0.35, 0.35, 0.35, 0.35),
            *(0.42115124735378853, 0.575, 0.66819805153394639, 0.79433939730795873),
            *(0.8, 0.8, 0.8),
        ),
    ),
}

# Short tables at the ends of the range of D (same recipe): (args, λ(0), λ(1), ...).
WSD_EDGES: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    # D = 0: no decay phase, λ jumps from W to A at M.
    "D = 0": (
        dict(
            warmup_to_value=0.8,
            anneal_to_value=0.1,
            num_warmup_steps=2,
            num_training_steps=6,
            num_decay_steps=0,
        ),
        (0.0, 0.4, 0.8, 0.8, 0.8, 0.8, 0.1, 0.1, 0.1),
    ),
    # D = M - L: no stable phase, the decay starts right after warmup.
    "D = M - L": (
        dict(
            warmup_to_value=0.8,
            anneal_to_value=0.2,
            num_warmup_steps=2,
            num_training_steps=6,
            num_decay_steps=4,
            decay_shape="cosine",
        ),
        (0.0, 0.4, 0.8, 0.71213203435596426, 0.5, 0.28786796564403574, 0.2, 0.2, 0.2),
    ),
    # L = 0 and D = M: the whole run is the decay.
    "L = 0, D = M": (
        dict(
            warmup_to_value=0.8,
            anneal_to_value=0.2,
            num_warmup_steps=0,
            num_training_steps=4,
            num_decay_steps=4,
            decay_shape="sqrt",
        ),
        (0.8, 0.5, 0.37573593128807149, 0.28038475772933681, 0.2, 0.2, 0.2),
    ),
}


def _wsd_args(shape: str) -> dict[str, Any]:
    W, A, _ = WSD_CASES[shape]
    return dict(
        warmup_to_value=W,
        anneal_to_value=A,
        num_warmup_steps=L,
        num_training_steps=M,
        num_decay_steps=D,
        decay_shape=shape,
    )


def test_wsd_tables_are_informative():
    """Outside the stable phase (W from L to S) and the clamped tail (A), values are pairwise
    distinct, so an off-by-one in t, L, S or M, or a swapped W/A, cannot pass unnoticed."""
    for shape, (W, A, expected) in WSD_CASES.items():
        moving = [v for t, v in zip(WSD_TS, expected) if t < L or S < t < M]
        assert len(set(moving)) == len(moving), shape
        assert [v for t, v in zip(WSD_TS, expected) if L <= t <= S] == [W] * 4, shape
        assert [v for t, v in zip(WSD_TS, expected) if t >= M] == [A] * 3, shape


@pytest.mark.parametrize("shape", list(WSD_CASES))
def test_wsd_pure_curve_matches_table(shape: str):
    curve = warmup_stable_decay(**_wsd_args(shape))
    got = [curve(t) for t in WSD_TS]
    assert got == pytest.approx(list(WSD_CASES[shape][2]), rel=0, abs=TOL)


@pytest.mark.parametrize("shape", list(WSD_CASES))
def test_wsd_bound_schedule_matches_table(shape: str):
    _assert_bound_matches(
        "warmup_stable_decay", _wsd_args(shape), dict(zip(WSD_TS, WSD_CASES[shape][2]))
    )


@pytest.mark.parametrize("edge", list(WSD_EDGES))
def test_wsd_edges_of_num_decay_steps(edge: str):
    args, expected = WSD_EDGES[edge]
    curve = warmup_stable_decay(**args)
    assert [curve(t) for t in range(len(expected))] == pytest.approx(expected, rel=0, abs=TOL)
    _assert_bound_matches("warmup_stable_decay", args, dict(enumerate(expected)))


def test_wsd_default_shape_is_linear_and_lr_is_the_default_target():
    args = {k: v for k, v in _wsd_args("linear").items() if k != "decay_shape"}
    curve = warmup_stable_decay(**args)
    expected = WSD_CASES["linear"][2]
    assert [curve(t) for t in WSD_TS] == pytest.approx(list(expected), rel=0, abs=TOL)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = schedany.warmup_stable_decay(optimizer, **args)
    for t in range(max(WSD_TS) + 1):
        if t in WSD_TS:
            lam = expected[WSD_TS.index(t)]
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lam, rel=0, abs=TOL)
        optimizer.step()
        schedule.step()


# ---- properties -------------------------------------------------------------------

values = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_infinity=False)
exponents = st.one_of(
    st.floats(min_value=1e-6, max_value=50.0),
    st.floats(min_value=1e-300, max_value=1e300, exclude_min=False),
)
multipliers = st.floats(min_value=1.0, max_value=100.0)
annealing = st.sampled_from(["cosine", "polynomial"])


@st.composite
def curves(draw, warmup: str | None = None, min_warmup: int = 0, strict_anneal: bool = False):
    L = draw(st.integers(min_value=min_warmup, max_value=60))
    M = L + draw(st.integers(min_value=1 if strict_anneal else 0, max_value=300))
    if M == 0:
        M = 1
    kwargs = dict(
        warmup_to_value=draw(values),
        anneal_to_value=draw(values),
        num_warmup_steps=L,
        num_training_steps=M,
        anneal=draw(annealing),
        warmup=warmup or draw(st.sampled_from(["normal", "inverse"])),
        polynomial_exponent=draw(exponents),
        warmup_multiplier=draw(multipliers),
    )
    return kwargs, warmup_anneal_curve(**kwargs)


def _tol(*xs: float) -> float:
    return 4 * math.ulp(max(1.0, *(abs(x) for x in xs)))


@given(curves(warmup="normal", min_warmup=1, strict_anneal=True))
@settings(deadline=None)
def test_normal_warmup_is_continuous_at_L(drawn):
    kwargs, curve = drawn
    W, A, L = kwargs["warmup_to_value"], kwargs["anneal_to_value"], kwargs["num_warmup_steps"]
    assert curve(L) == pytest.approx(W, rel=0, abs=_tol(W, A))
    assert curve(L - 1) == pytest.approx(W * (L - 1) / L, rel=0, abs=_tol(W))
    # the step into L is one more warmup step: |λ(L) - λ(L-1)| = |W| / L
    assert abs(curve(L) - curve(L - 1)) == pytest.approx(abs(W) / L, rel=0, abs=_tol(W, A))


@given(curves(), st.integers(min_value=1, max_value=10**12))
@settings(deadline=None)
def test_hits_A_at_M_and_stays_there(drawn, beyond):
    kwargs, curve = drawn
    A, M = kwargs["anneal_to_value"], kwargs["num_training_steps"]
    assert curve(M) == A
    for t in (M + 1, M + 2, M + beyond, 2 * M, 10 * M + 7):
        assert curve(t) == A


@given(curves())
@settings(max_examples=60, deadline=None)
def test_stays_between_A_and_W_after_warmup(drawn):
    kwargs, curve = drawn
    W, A = kwargs["warmup_to_value"], kwargs["anneal_to_value"]
    L, M = kwargs["num_warmup_steps"], kwargs["num_training_steps"]
    lo, hi, tol = min(A, W), max(A, W), _tol(W, A)
    for t in range(L, M + 5):
        assert lo - tol <= curve(t) <= hi + tol, t


@given(curves(), st.integers(min_value=0, max_value=10**6))
@settings(deadline=None)
def test_never_complex_or_nan_for_any_positive_exponent(drawn, t):
    kwargs, curve = drawn
    M = kwargs["num_training_steps"]
    for step in (t, t % (M + 1), kwargs["num_warmup_steps"], M):
        value = curve(step)
        assert type(value) is float, (step, value)
        assert math.isfinite(value), (step, value)


@given(curves(warmup="inverse", min_warmup=1))
@settings(deadline=None)
def test_inverse_warmup_descends_from_R_times_W_to_W(drawn):
    kwargs, curve = drawn
    W, R, L = kwargs["warmup_to_value"], kwargs["warmup_multiplier"], kwargs["num_warmup_steps"]
    assert curve(0) == pytest.approx(W * R, rel=1e-12, abs=_tol(W))
    steps = [curve(t) for t in range(L)]
    assert steps[-1] == pytest.approx(W * (R - (R - 1) * (L - 1) / L), rel=1e-12, abs=_tol(W))
    if W >= 0:  # R >= 1, so the warmup never climbs
        assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_numpy_integer_step_counts_are_accepted():
    """Samplers (Ray Tune, numpy) hand out numpy integers; they are integers."""
    np = pytest.importorskip("numpy")
    curve = warmup_anneal_curve(
        warmup_to_value=1.0,
        anneal_to_value=0.0,
        num_warmup_steps=np.int64(2),
        num_training_steps=np.int32(4),
    )
    assert [curve(t) for t in range(6)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


shapes = st.sampled_from(["linear", "cosine", "sqrt"])


@st.composite
def wsd_curves(draw, min_warmup: int = 0, min_stable: int = 0, min_decay: int = 0):
    L = draw(st.integers(min_value=min_warmup, max_value=60))
    stable = draw(st.integers(min_value=min_stable, max_value=100))
    D = draw(st.integers(min_value=min_decay, max_value=200))
    kwargs = dict(
        warmup_to_value=draw(values),
        anneal_to_value=draw(values),
        num_warmup_steps=L,
        num_training_steps=max(L + stable + D, 1),
        num_decay_steps=D,
        decay_shape=draw(shapes),
    )
    return kwargs, warmup_stable_decay(**kwargs)


@given(wsd_curves(min_warmup=1, min_stable=1, min_decay=1))
@settings(deadline=None)
def test_wsd_is_continuous_at_L_and_at_the_decay_start(drawn):
    kwargs, curve = drawn
    W, A, L = kwargs["warmup_to_value"], kwargs["anneal_to_value"], kwargs["num_warmup_steps"]
    D = kwargs["num_decay_steps"]
    S = kwargs["num_training_steps"] - D
    # into L: one more warmup step of W / L, then W exactly
    assert curve(L - 1) == pytest.approx(W * (L - 1) / L, rel=0, abs=_tol(W))
    assert curve(L) == W
    # into S: still W (p = 0), then one decay step, no bigger than the first step of the
    # steepest shape (sqrt: |W - A| / sqrt(D))
    assert curve(S - 1) == W
    assert curve(S) == pytest.approx(W, rel=0, abs=_tol(W, A))
    assert abs(curve(S + 1) - curve(S)) <= abs(W - A) / math.sqrt(D) + _tol(W, A)


@given(wsd_curves(), st.integers(min_value=1, max_value=10**12))
@settings(deadline=None)
def test_wsd_hits_A_at_M_and_stays_there(drawn, beyond):
    kwargs, curve = drawn
    A, M = kwargs["anneal_to_value"], kwargs["num_training_steps"]
    for t in (M, M + 1, M + beyond, 2 * M, 10 * M + 7):
        assert curve(t) == A


@given(wsd_curves())
@settings(max_examples=60, deadline=None)
def test_wsd_decay_moves_monotonically_from_W_to_A(drawn):
    kwargs, curve = drawn
    W, A = kwargs["warmup_to_value"], kwargs["anneal_to_value"]
    M, D = kwargs["num_training_steps"], kwargs["num_decay_steps"]
    tol = _tol(W, A)
    values = [curve(t) for t in range(M - D, M + 3)]
    assert all(min(A, W) - tol <= v <= max(A, W) + tol for v in values)
    sign = 1.0 if A >= W else -1.0  # the decay climbs when A > W
    assert all(sign * (b - a) >= -tol for a, b in zip(values, values[1:]))
