import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from seedtune.client.zo_step import privatize, privatize_vectors, zo_step
from seedtune.shared.privacy.accounting import (PrivacyAccountant, StepRun, calibrate_noise_multiplier, gaussian_step,
                                                pld_epsilon)
from seedtune.shared.privacy.noise import Noise, SecureRandom
from seedtune.shared.engine.selection import select_pruned
from seedtune.shared.engine.update import ScoredView
from tests.helpers import LABELS, SENTENCES


def test_empirical_noise_std_matches_the_configured_one():
    rng = SecureRandom()
    samples = rng.noise(Noise.gaussian(2.5), 20_000)
    assert abs(samples.mean()) < 0.06
    assert samples.std() == pytest.approx(2.5, rel=0.03)


def test_privatized_scalar_has_the_calibrated_std_on_the_mean():
    rng = SecureRandom()
    g = np.array([5.0, -50.0, 0.5, 300.0])  # two of them exceed the clip
    clip, sigma, expected_batch = 10.0, 1.3, 8.0
    out = np.array([privatize(g, clip, expected_batch, Noise.gaussian(sigma), rng)[0] for _ in range(20_000)])
    # 5 standard errors of the mean (1.625 / sqrt(20,000)): the noise is unseeded by design
    assert out.mean() == pytest.approx((5 - 10 + 0.5 + 10) / expected_batch, abs=0.06)
    assert out.std() == pytest.approx(sigma * clip / expected_batch, rel=0.03)
    assert privatize(g, clip, expected_batch, None, rng)[1] == 2


def test_several_directions_clip_each_example_vector_in_l2_and_noise_each_coordinate():
    rng = SecureRandom()
    g = np.array([[3.0, 4.0], [0.3, -0.4], [-30.0, 0.0]])  # norms 5, 0.5, 30: two exceed the clip
    clip, sigma, expected_batch = 2.0, 0.7, 4.0
    exact, clipped = privatize_vectors(g, clip, expected_batch, None, rng)
    assert clipped == 2
    np.testing.assert_allclose(exact, (np.array([1.2, 1.6]) + [0.3, -0.4] + [-2.0, 0.0]) / expected_batch)
    out = np.array([privatize_vectors(g, clip, expected_batch, Noise.gaussian(sigma), rng)[0] for _ in range(20_000)])
    np.testing.assert_allclose(out.mean(axis=0), exact, atol=0.01)
    np.testing.assert_allclose(out.std(axis=0), sigma * clip / expected_batch, rtol=0.03)
    assert abs(np.corrcoef(out.T)[0, 1]) < 0.03  # independent draws per direction
    # One direction: the L2 clip of a 1-vector is the [-C, C] clip of the scalar.
    assert privatize(g[:, 0], clip, expected_batch, None, rng)[0] == pytest.approx((2.0 + 0.3 - 2.0) / 4.0)


def test_noise_is_not_a_function_of_the_direction_seed(tiny_decoder):
    task = tiny_decoder
    view = ScoredView(task, select_pruned(task.module, task.synflow_output, 0.05))
    ids = task.encode(SENTENCES)
    kwargs = dict(seeds=(1234,), mu=1e-3, sample_rate=1.0, microbatch=4, rng=SecureRandom(), clip=1.0,
                  noise=Noise.gaussian(1.0))
    a = zo_step(view, ids, LABELS, **kwargs)
    b = zo_step(view, ids, LABELS, **kwargs)
    assert a.seeds == b.seeds and a.batch_size == b.batch_size == len(SENTENCES)
    assert a.scalars != b.scalars  # same public seed, same data: only the secret noise differs
    c = zo_step(view, ids, LABELS, **{**kwargs, "noise": None})
    d = zo_step(view, ids, LABELS, **{**kwargs, "noise": None})
    assert c.scalars == d.scalars  # without noise the estimate is deterministic


def test_poisson_sampling_rate():
    rng = SecureRandom()
    sizes = [len(rng.poisson_sample(10_000, 0.01)) for _ in range(200)]
    assert np.mean(sizes) == pytest.approx(100, rel=0.03)
    assert np.var(sizes) == pytest.approx(100 * 0.99, rel=0.3)
    with pytest.raises(ValueError, match="sampling rate"):
        rng.poisson_sample(10, 0.0)


CASES = [(64 / 50_000, 1.0, 1000), (32 / 60_614, 0.6, 800), (0.01, 1.0, 1000), (0.05, 2.0, 500)]


@pytest.mark.parametrize("q,sigma,steps", CASES)
def test_pld_matches_an_independent_prv_accountant_and_beats_rdp(q, sigma, steps):
    accountant = PrivacyAccountant()
    accountant.record(Noise.gaussian(sigma), q, steps)
    eps = accountant.epsilon(1e-5)
    prv = PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(noise_multiplier=sigma, sampling_probability=q)],
                        max_self_compositions=[steps], eps_error=0.005, delta_error=1e-11)
    low, estimate, high = prv.compute_epsilon(delta=1e-5, num_self_compositions=[steps])
    assert eps == pytest.approx(estimate, rel=0.01)
    assert eps < accountant.rdp_epsilon(1e-5)


def test_runs_of_identical_steps_compose_like_one_event():
    one_by_one = PrivacyAccountant()
    for _ in range(50):
        one_by_one.record(Noise.gaussian(1.0), 0.01)
    assert one_by_one.runs == [StepRun(Noise.gaussian(1.0), 0.01, 50)]
    mixed = PrivacyAccountant()
    mixed.record(Noise.gaussian(1.0), 0.01, 30)
    mixed.record(Noise.gaussian(2.0), 0.01, 20)
    assert mixed.steps == 50 and len(mixed.runs) == 2
    assert mixed.epsilon(1e-5) < one_by_one.epsilon(1e-5)
    assert PrivacyAccountant().epsilon(1e-5) == 0.0


@pytest.mark.parametrize("target,q,steps", [(3.0, 32 / 60_614, 800), (1.0, 0.01, 500)])
def test_calibration_round_trips(target, q, steps):
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps)
    from dp_accounting import SelfComposedDpEvent

    eps = pld_epsilon(SelfComposedDpEvent(gaussian_step(sigma, q), steps), 1e-5)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    looser = pld_epsilon(SelfComposedDpEvent(gaussian_step(sigma * 0.97, q), steps), 1e-5)
    assert looser > target  # a little less noise would overshoot: the calibration is tight


@pytest.mark.parametrize("bad", [dict(epsilon=-1.0), dict(delta=1.5), dict(steps=0), dict(sample_rate=0.0)])
def test_calibration_rejects_bad_values(bad):
    args = dict(epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=10) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        calibrate_noise_multiplier(**args)


def test_the_accountant_saves_restores_and_answers_what_if_without_spending():
    gauss, laplace = Noise.gaussian(1.1), Noise.laplace(0.7)
    accountant = PrivacyAccountant()
    accountant.record(gauss, 0.01, 300)
    accountant.record(laplace, 0.02, 40)
    back = PrivacyAccountant.from_json(accountant.to_json())
    assert back == accountant and back.epsilon(1e-5) == accountant.epsilon(1e-5)
    more = accountant.after(laplace, 0.02, 10)
    assert accountant.steps == 340 and more.steps == 350 and more.epsilon(1e-5) > accountant.epsilon(1e-5)
    assert more.runs[-1] == StepRun(laplace, 0.02, 50)  # merged into the last run: one cached epsilon per history
    leaked = PrivacyAccountant.from_json(accountant.after(None, 1.0, 1).to_json())
    assert leaked.non_private and leaked.epsilon(1e-5) == float("inf")
    with pytest.raises(ValueError, match="not a saved PrivacyAccountant"):
        PrivacyAccountant.from_json('{"runs": [["gaussian", 0.1, 3]]}')
