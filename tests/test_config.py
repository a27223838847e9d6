"""TSTConfig against the method's definitions (../shared/TST.md), written out independently here:
the weights of the s targets of a bag, the phase schedule, and the errors for bad values."""
import math

import pytest

from tst_megatron.config import TSTConfig


def _normalised(raw):
    total = sum(raw)
    return [x / total for x in raw]


@pytest.mark.parametrize("s", [1, 2, 4, 8, 16])
def test_bag_weights_follow_each_definition(s):
    d = list(range(1, s + 1))  # distance of a target from the bag's end, nearest first
    expected = {
        "uniform": [1.0 / s] * s,
        "power": _normalised([1.0 / i for i in d]),
        "exp": _normalised([math.exp(-i) for i in d]),
        "first": [1.0] + [0.0] * (s - 1),
        # the paper's fit of token mutual information at distance d: 3.63 + 1.35 * d^-1.25
        "fitted": _normalised([3.63 + 1.35 * i ** -1.25 for i in d]),
    }
    for weighting, want in expected.items():
        got = TSTConfig(bag_size=s, bag_weighting=weighting).bag_weights()
        assert len(got) == s and math.isclose(sum(got), 1.0, rel_tol=1e-12), weighting
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), weighting
    # the nearest target never weighs less than a farther one (except uniform's ties)
    for weighting in ("power", "exp", "fitted"):
        w = TSTConfig(bag_size=s, bag_weighting=weighting).bag_weights()
        assert all(a > b for a, b in zip(w, w[1:])), weighting


def test_fitted_constants_are_overridable():
    cfg = TSTConfig(bag_size=3, bag_weighting="fitted", fitted_c0=0.0, fitted_a=1.0, fitted_k=-1.0)
    assert cfg.bag_weights() == pytest.approx(_normalised([1.0, 1 / 2, 1 / 3]))  # = power


def test_phase_schedule_from_ratio_and_from_iterations():
    cfg = TSTConfig(bag_size=4, superposition_ratio=0.3)
    assert cfg.num_superposition_iters(100) == 30
    assert [cfg.phase(i, 100) for i in (0, 29, 30, 99)] == ["superposition"] * 2 + ["recovery"] * 2
    assert TSTConfig(bag_size=4, superposition_ratio=0.3).num_superposition_iters(7) == 2  # floor(2.1)
    explicit = TSTConfig(bag_size=2, superposition_ratio=0.9, superposition_iters=5)
    assert explicit.num_superposition_iters(100) == 5  # the count wins over the ratio
    assert explicit.phase(4, 100) == "superposition" and explicit.phase(5, 100) == "recovery"
    off = TSTConfig(bag_size=1, superposition_ratio=0.5)  # s = 1 is the baseline: no superposition
    assert not off.enabled and off.num_superposition_iters(100) == 0 and off.phase(0, 100) == "recovery"


@pytest.mark.parametrize("kwargs, field", [
    (dict(bag_size=0), "bag_size"),
    (dict(bag_size=2.0), "bag_size"),
    (dict(bag_size=True), "bag_size"),
    (dict(superposition_ratio=1.0), "superposition_ratio"),
    (dict(superposition_ratio=-0.1), "superposition_ratio"),
    (dict(superposition_ratio=float("nan")), "superposition_ratio"),
    (dict(superposition_iters=-1), "superposition_iters"),
    (dict(bag_weighting="linear"), "bag_weighting"),
    (dict(mode="both"), "mode"),
    (dict(bag_size=4, bag_weighting="fitted", fitted_c0=-10.0), "fitted_c0"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TSTConfig(**kwargs)


def test_superposition_must_leave_a_recovery_phase():
    cfg = TSTConfig(bag_size=4, superposition_iters=10)
    with pytest.raises(ValueError, match="must be < train iterations"):
        cfg.num_superposition_iters(10)
    assert cfg.num_superposition_iters(11) == 10
