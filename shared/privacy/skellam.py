"""Distributed Skellam noise: what each node adds when the server learns only the sum (secure aggregation).

Today a node adds the whole Gaussian noise to its own scalars. Under secure aggregation the server sees only the
sum over the surviving nodes, so each node can add a part of the noise such that the sum carries all of it:
M nodes with 1/M of the variance each give the aggregate sqrt(M) less noise than M nodes with all of it. Secure
aggregation works on integers modulo 2^64, and a sum of independent Gaussians stays Gaussian only before
rounding; the Skellam distribution (the difference of two independent Poissons of mean mu/2, variance mu) is
integer and closed under sums: t nodes adding Skellam(mu / t) give exactly Skellam(mu). The distributed discrete
Gaussian is the alternative; its sum is only close to a discrete Gaussian (Kairouz, Liu, Steinke 2021), an extra
term the accounting must carry, where Skellam's sum is exact (Agarwal, Kairouz, Liu 2021).

The mechanism, per step of K directions, for one node:

1. each example's estimate, clipped to L2 norm C as today (client.zo_step), is scaled by ``gamma`` and rounded
   to integers coordinate by coordinate, up or down at random (unbiased; CSPRNG), *per example*: every rounded
   vector then lies within ``gamma C + sqrt(K)`` in L2 and ``sqrt(K) gamma C + K`` in L1 whatever the coin flips,
   so adding or removing one example moves the node's integer sum by at most those (the sensitivities);
2. the node adds Skellam noise of variance ``mu / t`` per coordinate, from the CSPRNG.

With at least t nodes surviving, the sum carries Skellam noise of variance >= mu: the *central* guarantee, which
:meth:`SkellamPlan.epsilon` accounts. If secure aggregation fails (the server sees one node's vector), that node's
own noise of variance mu / t is what protects it: the *local* guarantee, accounted the same way
(``local=True``). Each holder's ledger records both.

Accounting is Renyi DP: the Skellam mechanism's RDP for integer vectors with L1 and L2 sensitivities
(Agarwal et al. 2021, Corollary 3.6), amplified by Poisson sampling with Zhu and Wang's general bound (ICML 2019,
Theorem 5, integer orders), composed over steps and converted to (epsilon, delta) by dp-accounting. No PLD
library covers a multi-dimensional Skellam mechanism; for one coordinate (one direction per step, the main job)
:func:`pld_epsilon_1d` computes the exact PLD of the subsampled mechanism from its two output distributions,
which is what a one-direction plan reports (the tests check the RDP bound lies above it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.special import gammaln, logsumexp

from seedtune.shared.privacy.accounting import StepRun, noise_epsilon
from seedtune.shared.privacy.noise import SecureRandom, Skellam

ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512)  # integer RDP orders (the sampling bound needs them)
FIELD_BITS = 64  # secure aggregation adds modulo 2^64 (numpy uint64 arithmetic wraps exactly there)
ROUNDING_SHARE = 0.01  # default scale: the rounding adds at most 1% to the L2 sensitivity


def skellam_rdp(alpha: int, l1: float, l2: float, variance: float) -> float:
    """RDP at integer order ``alpha`` of adding Skellam noise of ``variance`` per coordinate to an integer vector
    of L1 sensitivity ``l1`` and L2 sensitivity ``l2`` (Agarwal, Kairouz, Liu 2021, Corollary 3.6): the Gaussian
    mechanism's ``alpha l2^2 / (2 mu)`` plus a discretisation term that vanishes as mu grows."""
    if alpha < 2 or variance <= 0:
        raise ValueError(f"order must be >= 2 and variance > 0, got {alpha}, {variance}")
    mu = variance
    return alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def subsampled_rdp(alpha: int, rate: float, rdp: Callable[[int], float]) -> float:
    """RDP at integer order ``alpha`` of a mechanism with RDP curve ``rdp`` run on a Poisson sample at ``rate``,
    add/remove neighbours: Zhu and Wang (ICML 2019), Theorem 5, the bound that holds for any mechanism.

        (alpha - 1) eps'(alpha) <= log[ (1-q)^(alpha-1) (alpha q - q + 1) + C(alpha, 2) q^2 (1-q)^(alpha-2) e^eps(2)
                                        + 3 sum_{l=3..alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ]

    It is never above the unsampled curve's value, which is returned where it is smaller."""
    if not 0 < rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
    if rate == 1:
        return rdp(alpha)
    log_q, log_1q = math.log(rate), math.log1p(-rate)
    terms = [(alpha - 1) * log_1q + math.log(alpha * rate - rate + 1),
             _log_comb(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + rdp(2)]
    terms += [math.log(3) + _log_comb(alpha, l) + l * log_q + (alpha - l) * log_1q + (l - 1) * rdp(l)
              for l in range(3, alpha + 1)]
    return min(float(logsumexp(terms)) / (alpha - 1), rdp(alpha))


def _log_comb(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon at ``delta``) of an RDP curve over :data:`ORDERS`, by dp-accounting's conversion."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, delta)[0])


@dataclass(frozen=True)
class SkellamPlan:
    """How a secure-aggregation federation quantises and noises one step's K-vector, and what that costs.

    ``clip`` is privacy.clip (each example's K-vector's L2 bound, in the scalars' units); ``scale`` (gamma) the
    integer units per unit; ``variance`` (mu) the central Skellam variance per coordinate, in integer units;
    ``threshold`` (t) the survivors secure aggregation requires, each node adding ``variance / threshold``."""

    clip: float
    directions: int
    scale: float
    variance: float
    threshold: int

    def __post_init__(self) -> None:
        for name in ("clip", "scale", "variance"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SkellamPlan.{name} must be positive and finite, got {value!r}")
        if self.directions < 1 or self.threshold < 1:
            raise ValueError(f"directions and threshold must be >= 1, got {self.directions}, {self.threshold}")

    @property
    def l2_sensitivity(self) -> float:
        """One example's rounded vector's L2 norm, at most: ``gamma C`` plus ``sqrt(K)`` (each coordinate moves
        by less than 1 in rounding); ``ceil(gamma C)`` for one coordinate."""
        if self.directions == 1:
            return float(math.ceil(self.scale * self.clip))
        return self.scale * self.clip + math.sqrt(self.directions)

    @property
    def l1_sensitivity(self) -> float:
        """The same vector's L1 norm, at most: ``sqrt(K) gamma C + K`` (``ceil(gamma C)`` for one coordinate)."""
        if self.directions == 1:
            return self.l2_sensitivity
        return math.sqrt(self.directions) * self.scale * self.clip + self.directions

    @property
    def node_variance(self) -> float:
        """The Skellam variance each node adds per coordinate."""
        return self.variance / self.threshold

    @property
    def noise_multiplier(self) -> float:
        """The central noise std over the L2 sensitivity: the Gaussian noise multiplier it compares with."""
        return math.sqrt(self.variance) / self.l2_sensitivity

    def rdp(self, sample_rate: float, steps: int, local: bool = False) -> np.ndarray:
        """RDP curve over :data:`ORDERS` of ``steps`` steps on Poisson samples at ``sample_rate``: with the
        central noise (at least ``threshold`` survivors), or with this node's own noise alone (``local``)."""
        variance = self.node_variance if local else self.variance
        l1, l2 = self.l1_sensitivity, self.l2_sensitivity
        step = [subsampled_rdp(a, sample_rate, lambda o: skellam_rdp(o, l1, l2, variance)) for a in ORDERS]
        return steps * np.array(step)

    def epsilon(self, sample_rate: float, steps: int, delta: float, local: bool = False) -> float:
        """(epsilon at ``delta``) after ``steps`` steps: central (default) or local. One direction per step:
        the exact PLD of the one-coordinate mechanism, whose rounded example lies within ``ceil(gamma C)``;
        several: the RDP bound (the general sampling bound costs about 40% more noise than the PLD at the
        main job's settings, so K = 1 gets the PLD)."""
        if steps == 0:
            return 0.0
        if self.directions == 1:
            return pld_epsilon_1d(int(self.l2_sensitivity), self.node_variance if local else self.variance,
                                  sample_rate, steps, delta)
        return rdp_to_epsilon(self.rdp(sample_rate, steps, local), delta)

    def field_limit(self, nodes: int) -> int:
        """The largest |value| a node may contribute per coordinate so that no sum of ``nodes`` contributions
        wraps around the field: a node whose clipped sum plus noise goes past it refuses the round instead (at
        gamma C = 3,200, the limit for 1,000 nodes is 4.6e15, a batch of 1.4e12 examples)."""
        return (1 << (FIELD_BITS - 1)) // max(nodes, 1) - 1

    def noise(self) -> Skellam:
        """The central noise as the ledger header pins and every accountant composes it (one direction only: the
        exact PLD covers one coordinate)."""
        if self.directions != 1:
            raise ValueError(f"a Skellam noise record covers one direction per step, not {self.directions}")
        return Skellam(self.variance, int(self.l2_sensitivity))


def default_scale(clip: float, directions: int, share: float = ROUNDING_SHARE) -> float:
    """The scale gamma at which rounding adds at most ``share`` to the L2 sensitivity: ``gamma C >= sqrt(K) /
    share`` (3,200 integer units per clip for K = 1,024). The field has room for far more; a larger gamma costs
    nothing but bits."""
    return math.sqrt(directions) / (share * clip)


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, clip: float, directions: int,
              threshold: int, scale: float | None = None) -> SkellamPlan:
    """The plan with the least central variance whose central epsilon after ``steps`` is at most ``epsilon``
    (bisection on the noise multiplier, to 0.1%)."""
    if not (epsilon > 0 and math.isfinite(epsilon)) or steps < 1:
        raise ValueError(f"target epsilon must be positive and finite and steps >= 1, got {epsilon}, {steps}")
    gamma = scale if scale is not None else default_scale(clip, directions)

    def plan(multiplier: float) -> SkellamPlan:
        base = SkellamPlan(clip, directions, gamma, 1.0, threshold)
        return SkellamPlan(clip, directions, gamma, (multiplier * base.l2_sensitivity) ** 2, threshold)

    lo, hi = 0.25, 1.0
    while plan(hi).epsilon(sample_rate, steps, delta) > epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no Skellam noise reaches epsilon {epsilon} at delta {delta} over {steps} steps")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if plan(mid).epsilon(sample_rate, steps, delta) <= epsilon else (mid, hi)
    return plan(hi)


def quantize(vectors: np.ndarray, scale: float, rng: SecureRandom, limit: int | None = None) -> np.ndarray:
    """Each row of ``vectors`` (already clipped) times ``scale``, rounded to an integer up or down at random with
    the probabilities that keep it unbiased (int64). The coin flips come from the CSPRNG: they are part of the
    mechanism, not of the public direction. With ``limit`` (an integer) every scaled value is first held to
    [-limit, limit]: a row clipped in floating point can come out a few ulps above its bound, and a coin must
    never round it past the sensitivity."""
    scaled = np.asarray(vectors, dtype=np.float64) * scale
    if limit is not None:
        scaled = np.clip(scaled, -limit, limit)
    low = np.floor(scaled)
    up = rng.uniform(scaled.size).reshape(scaled.shape) < (scaled - low)
    return (low + up).astype(np.int64)


def pld_epsilon_1d(sensitivity: int, variance: float, sample_rate: float, steps: int, delta: float) -> float:
    """Exact-PLD epsilon of ``steps`` one-coordinate Skellam releases of integer ``sensitivity`` on Poisson samples
    (:class:`shared.privacy.noise.Skellam`'s PLD, composed by the one accountant every epsilon comes from)."""
    return noise_epsilon((StepRun(Skellam(variance, sensitivity), sample_rate, steps),), delta)
