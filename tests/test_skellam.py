"""Distributed Skellam noise (shared.privacy.skellam): the sampler, the rounding, the accountant, the noise gain."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from seedtune.client.zo_step import integer_release
from seedtune.shared.privacy.accounting import (PrivacyAccountant, StepRun, calibrate_noise_multiplier, noise_epsilon,
                                                step_pld)
from seedtune.shared.privacy.noise import Noise, SecureRandom, Skellam
from seedtune.shared.privacy.rdp import ORDERS, rdp_to_epsilon, subsampled_rdp, subsampled_skellam_curve
from seedtune.shared.privacy.skellam import SkellamPlan, calibrate, gaussian_ratio, pld_epsilon_1d, quantize


def _fits(draws: np.ndarray, dist) -> bool:
    """Chi-square of integer draws against a discrete distribution over 20 quantile bins, at p > 1e-4."""
    edges = np.unique(dist.ppf(np.linspace(0.0, 1.0, 21)[1:-1])).astype(int)
    observed = np.bincount(np.searchsorted(edges, draws, side="left"), minlength=len(edges) + 1)
    expected = np.diff(np.concatenate([[0.0], dist.cdf(edges), [1.0]])) * draws.size
    return bool(stats.chisquare(observed, expected).pvalue > 1e-4)


@pytest.mark.parametrize("lam", [0.7, 9.5, 10.0, 300.0, 2.5e6])
def test_poisson_draws_follow_the_distribution(lam):
    """Both branches of the sampler (products of uniforms below 10, PTRS above)."""
    draws = SecureRandom().poisson(lam, 100_000)
    assert draws.dtype == np.int64 and draws.min() >= 0
    assert _fits(draws, stats.poisson(lam))


def test_skellam_noise_sums_to_skellam_noise():
    """t nodes adding variance mu / t give the sum variance mu, with Skellam's zero mean (closure under sums)."""
    rng, mu, t = SecureRandom(), 5000.0, 5
    total = sum(Skellam.integers(rng, 200_000, mu / t) for _ in range(t))
    assert abs(total.mean()) < 4 * math.sqrt(mu / 200_000)
    assert total.var() == pytest.approx(mu, rel=0.02)
    assert _fits(total, stats.skellam(mu / 2, mu / 2))


def test_rounding_is_unbiased_and_within_one_unit():
    rng = SecureRandom()
    vectors = np.tile(np.array([[0.25, -1.7, 3.0]]), (200_000, 1))
    rounded = quantize(vectors, 10.0, rng)
    assert np.all(np.abs(rounded - vectors * 10.0) < 1)
    assert np.allclose(rounded.mean(axis=0), [2.5, -17.0, 30.0], atol=0.01)
    assert np.all(rounded[:, 2] == 30)  # an integer stays put


def test_the_sampling_bound_is_never_below_the_exact_subsampled_gaussian():
    """Zhu-Wang's general bound, fed the Gaussian's RDP curve, must lie above dp-accounting's exact value for the
    subsampled Gaussian at every order: a bound below it would be wrong."""
    for sigma, q in [(0.8, 0.01), (1.4, 0.08), (3.0, 0.5)]:
        exact = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, sigma, ORDERS)
        bound = [subsampled_rdp(a, q, lambda o: o / (2 * sigma**2)) for a in ORDERS]
        assert np.all(np.array(bound) >= np.asarray(exact) * (1 - 1e-9))


def test_the_rdp_bound_is_above_the_exact_pld_in_one_dimension():
    plan = SkellamPlan(clip=1.0, directions=1, scale=50.0, variance=(1.5 * 50) ** 2, threshold=1)
    for steps in (1, 50):
        rdp = rdp_to_epsilon(steps * subsampled_skellam_curve(50.0, 50.0, plan.variance, 0.05), 1e-5)
        pld = pld_epsilon_1d(50, plan.variance, 0.05, steps, 1e-5)
        assert pld <= rdp


def test_a_smaller_rounded_shift_never_costs_more():
    """One direction is accounted at the largest rounded example, ceil(gamma C); any smaller shift costs less."""
    costs = [pld_epsilon_1d(shift, 60.0**2, 0.05, 20, 1e-5) for shift in (10, 25, 40, 49, 50)]
    assert costs == sorted(costs)


def test_one_direction_skellam_costs_what_the_gaussian_costs():
    """At a variance this large the Skellam mechanism is the Gaussian one: calibrated to the same target, the
    noise multiplier is within 2% of the PLD-calibrated Gaussian's."""
    plan = calibrate(3.0, 1e-5, 0.08, 100, clip=1.0, directions=1, threshold=10)
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.08, 100)
    assert plan.epsilon(0.08, 100, 1e-5) <= 3.0
    assert plan.noise_multiplier == pytest.approx(sigma, rel=0.02)
    # each node's own share protects it far less: the local guarantee is reported beside the central one
    assert plan.epsilon(0.08, 100, 1e-5, local=True) > 3 * plan.epsilon(0.08, 100, 1e-5)


def test_calibration_meets_the_target_with_many_directions():
    plan = calibrate(2.0, 1e-5, 0.05, 30, clip=0.5, directions=64, threshold=3)
    assert plan.scale * plan.clip == pytest.approx(800.0)  # rounding adds 1% at most
    assert 1.9 < plan.epsilon(0.05, 30, 1e-5) <= 2.0
    assert plan.node_variance == pytest.approx(plan.variance / 3)


def test_distributed_noise_is_sqrt_m_smaller_at_the_same_central_epsilon():
    """M = 10 nodes, the same target epsilon per holder: today each adds all the Gaussian noise to its scalar and
    the server averages; with secure aggregation each adds a tenth of the Skellam variance and the server divides
    the sum. Measured over 4,000 rounds of the samplers themselves, the aggregate's noise std is sqrt(10) smaller
    (to the two noise multipliers' ratio and the sampling error)."""
    m, rounds, q, steps = 10, 4000, 0.08, 100
    rng = SecureRandom()
    sigma = calibrate_noise_multiplier(3.0, 1e-5, q, steps)
    plan = calibrate(3.0, 1e-5, q, steps, clip=1.0, directions=1, threshold=m)
    clipped = rng.uniform(m) - 0.5  # each node's clipped sum (clip 1), the same in both modes
    today = (clipped[:, None] + sigma * rng.normal(m * rounds).reshape(m, rounds)).mean(axis=0)
    integers = quantize(clipped[:, None], plan.scale, rng)
    summed = (integers + Skellam.integers(rng, m * rounds, plan.node_variance).reshape(m, rounds)).sum(axis=0)
    secure = summed / plan.scale / m
    gain = np.std(today - clipped.mean()) / np.std(secure - clipped.mean())
    expected = math.sqrt(m) * sigma / plan.noise_multiplier * plan.l2_sensitivity / (plan.scale * plan.clip)
    assert gain == pytest.approx(expected, rel=0.05)
    assert gain == pytest.approx(math.sqrt(m), rel=0.06)


def test_the_field_never_wraps_for_the_values_a_node_may_send():
    plan = SkellamPlan(clip=1.0, directions=1024, scale=3200.0, variance=1e8, threshold=10)
    limit = plan.field_limit(1000)
    assert 1000 * limit < 2**63
    assert limit > 1e12 * plan.l2_sensitivity  # a trillion-example batch fits


@pytest.mark.parametrize("bad", [dict(clip=0.0), dict(variance=-1.0), dict(scale=math.inf), dict(threshold=0)])
def test_a_bad_plan_is_refused_by_name(bad):
    args = dict(clip=1.0, directions=1, scale=100.0, variance=1e4, threshold=2) | bad
    with pytest.raises(ValueError, match="threshold" if "threshold" in bad else next(iter(bad))):
        SkellamPlan(**args)


def test_the_plan_converts_its_rdp_with_dp_accountings_conversion():
    plan = SkellamPlan(clip=1.0, directions=4, scale=200.0, variance=1e6, threshold=2)
    rdp = 10 * plan.noise().rdp_curve(0.1)
    assert plan.epsilon(0.1, 10, 1e-6) == pytest.approx(
        rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, 1e-6)[0])


def test_a_row_clipped_a_few_ulps_above_its_bound_never_rounds_past_the_sensitivity():
    rows = np.full((10_000, 1), 1.0 + 3e-14)  # what float clipping to norm 1 can leave
    assert quantize(rows, 100.0, SecureRandom(), limit=100).max() == 100
    over = np.full((10_000, 1), 1.001)  # (further above, a coin would pass it in a tenth of the rows)
    assert quantize(over, 100.0, SecureRandom()).max() == 101
    assert quantize(over, 100.0, SecureRandom(), limit=100).max() == 100


def test_a_k_direction_record_carries_k_and_a_one_direction_record_stays_as_it_was():
    """The header pins the noise record: K > 1 must be in it (the accountant takes K coordinates' RDP from it), and
    a one-direction record keeps its old bytes, so existing ledgers' header digests do not move."""
    one = calibrate(3.0, 1e-5, 0.08, 100, clip=1.0, directions=1, threshold=10).noise()
    assert "directions" not in one.to_json() and Skellam.from_json(one.to_json()) == one
    many = calibrate(3.0, 1e-5, 0.08, 100, clip=1.0, directions=1024, threshold=10).noise()
    assert '"directions": 1024' in many.to_json() and Skellam.from_json(many.to_json()) == many
    assert many.sensitivity == 3200 and many.l2_sensitivity == 3200 + 32 and many.l1_sensitivity == 32 * 3200 + 1024


def test_k_directions_are_accounted_by_their_rdp_bound_everywhere():
    """Every accountant composes a K-coordinate Skellam record by its RDP bound: the plan, a holder's accountant
    (PrivacyAccountant), and a history that also holds PLD-accounted steps (basic composition, delta split)."""
    plan = calibrate(3.0, 1e-5, 0.25, 250, clip=1.0, directions=1024, threshold=10)
    noise = plan.noise()
    rdp = rdp_to_epsilon(250 * noise.rdp_curve(0.25), 1e-5)
    assert plan.epsilon(0.25, 250, 1e-5) == pytest.approx(rdp) and rdp <= 3.0
    accountant = PrivacyAccountant()
    accountant.record(noise, 0.25, 250)
    assert accountant.epsilon(1e-5) == pytest.approx(rdp)
    with pytest.raises(ValueError, match="no PLD"):
        step_pld(noise, 0.25)
    gaussian = Noise.gaussian(1.2)
    accountant.record(gaussian, 0.1, 50)
    mixed = accountant.epsilon(1e-5)
    alone = noise_epsilon((StepRun(gaussian, 0.1, 50),), 5e-6)
    assert mixed == pytest.approx(rdp_to_epsilon(250 * noise.rdp_curve(0.25), 5e-6) + alone)
    # the RDP bound never claims less than the exact Gaussian mechanism of the same L2 sensitivity and std
    sigma = plan.noise_multiplier
    assert rdp >= noise_epsilon((StepRun(Noise.gaussian(sigma), 0.25, 250),), 1e-5)


def test_one_examples_k_vector_moves_the_sum_by_at_most_the_records_sensitivities():
    """Each example alone through integer_release (its noise negligible): rows far past the clip, rows a few ulps
    over it, and rows whose every coordinate rounds by almost one unit stay within the record's L2 and L1
    sensitivities and every coordinate within the units, whatever the coins; and a release of another K than
    the record's is refused."""
    k, units, rng = 64, 800, SecureRandom()
    record, quiet = Skellam(1e6, units, k), Skellam(1e-12, units, k)
    with pytest.raises(ValueError, match=f"accounted for {k}"):
        integer_release(np.zeros((3, 4)), 1.0, record, 10, rng)
    gen = np.random.default_rng(0)
    far = 5 * gen.normal(size=(200, k))
    ulps = far / np.linalg.norm(far, axis=1, keepdims=True) * (1 + 3e-14)
    halves = np.tile(np.full(k, 1 / np.sqrt(k)) * (1 - 0.5 / (units / np.sqrt(k))), (200, 1))  # x.5 units each
    for rows in (far, ulps, halves):
        for row in rows:
            released = integer_release(row[None, :], 1.0, quiet, 1, rng)
            assert np.abs(released).max() <= units
            assert np.linalg.norm(released) <= record.l2_sensitivity
            assert np.abs(released).sum() <= record.l1_sensitivity


def test_the_k_direction_bound_costs_little_at_low_rates_and_much_at_high_ones():
    """What the server logs when it plans a K-direction secure run: the RDP bound's noise over the Gaussian's."""
    low = calibrate(3.0, 1e-5, 0.02, 250, clip=1.0, directions=1024, threshold=10)
    high = calibrate(3.0, 1e-5, 0.25, 250, clip=1.0, directions=1024, threshold=10)
    assert 1.0 < gaussian_ratio(low, 3.0, 1e-5, 0.02, 250) < 1.25 < 3.5 < gaussian_ratio(high, 3.0, 1e-5, 0.25, 250)
