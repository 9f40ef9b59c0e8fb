"""The one rule from released scalars to ledger coefficients (shared.protocol.aggregation)."""

from __future__ import annotations

import numpy as np
import pytest

from seedtune.shared.protocol.aggregation import RoundRule, aggregate, coefficient, coefficients


@pytest.fixture
def scalars() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(11, 5)).astype(np.float32)


def test_mean_trimmed_mean_and_median_per_seed(scalars):
    x = scalars.astype(np.float64)
    np.testing.assert_allclose(aggregate(scalars, "mean"), x.mean(0), rtol=1e-15)
    np.testing.assert_allclose(aggregate(scalars, "median"), np.median(x, 0), rtol=1e-15)
    t = int(0.2 * 11)  # two dropped at each end
    np.testing.assert_allclose(aggregate(scalars, "trimmed_mean", 0.2), np.sort(x, 0)[t:11 - t].mean(0), rtol=1e-15)
    even = scalars[:10]
    np.testing.assert_allclose(aggregate(even, "median"), np.median(even.astype(np.float64), 0), rtol=1e-15)


def test_a_robust_rule_ignores_one_poisoned_reply(scalars):
    poisoned = scalars.copy()
    poisoned[3] = 1e6
    assert np.abs(aggregate(poisoned, "mean")).max() > 1e4
    assert np.abs(aggregate(poisoned, "median")).max() < 3
    assert np.abs(aggregate(poisoned, "trimmed_mean", 0.1)).max() < 3


def test_aggregates_are_exact_whatever_the_order_of_the_replies():
    """fsum: the same scalars give the same coefficient in any order (an auditor need not know the order);
    a float64 running sum gives 0 or 1/3 here depending on the order."""
    import itertools

    values = np.array([[1e20], [1.0], [-1e20]], dtype=np.float32)
    assert np.float64(1e20) + 1.0 - 1e20 == 0.0  # what a naive sum in this order would give
    for order in itertools.permutations(range(3)):
        assert aggregate(values[list(order)], "mean")[0] == 1.0 / 3.0


def test_coefficients_are_float32_of_minus_lr_times_the_aggregate_and_never_negative_zero():
    c = coefficients(3e-3, np.array([1.0, -2.0, 0.0]))
    assert c.dtype == np.float32 and list(c) == [np.float32(-3e-3), np.float32(6e-3), 0.0]
    assert not np.signbit(c[2]) and coefficient(3e-3, 1.0) == float(np.float32(-3e-3))
    assert RoundRule("mean", 3e-3).coefficients(np.array([[1.0], [3.0]]))[0] == np.float32(-6e-3)


@pytest.mark.parametrize("args, message", [
    ((np.zeros((0, 3)), "mean"), r"\(M >= 1, K\)"),
    ((np.array([[np.nan]]), "mean"), "finite"),
    ((np.zeros((2, 2)), "mode"), "unknown aggregation rule 'mode'"),
    ((np.zeros((2, 2)), "trimmed_mean", 0.5), "trim must be in"),
])
def test_bad_input_is_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        aggregate(*args)
