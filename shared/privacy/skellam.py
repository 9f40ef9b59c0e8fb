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

Accounting: for one coordinate (one direction per step, the DP-ZO recipe) the exact PLD of the subsampled
mechanism from its two output distributions (:func:`pld_epsilon_1d`); for K directions (the head stage's frame),
which no PLD library covers, the Skellam mechanism's RDP for integer vectors with L1 and L2 sensitivities
(Agarwal et al. 2021, Corollary 3.6) amplified by Poisson sampling with Zhu and Wang's general bound (ICML 2019,
Theorem 5, integer orders), composed over steps and converted to (epsilon, delta) by dp-accounting
(shared.privacy.rdp; the tests check the RDP bound lies above the exact PLD for one coordinate). The noise record
(:class:`shared.privacy.noise.Skellam`) carries K, so every accountant (the server's, each holder's ledger) takes
the right one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seedtune.shared.privacy.accounting import StepRun, calibrate_noise_multiplier, noise_epsilon
from seedtune.shared.privacy.noise import SecureRandom, Skellam
FIELD_BITS = 64  # secure aggregation adds modulo 2^64 (numpy uint64 arithmetic wraps exactly there)
ROUNDING_SHARE = 0.01  # default scale: the rounding adds at most 1% to the L2 sensitivity


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
    def units(self) -> int:
        """Integer units per clip: the scaled clip, rounded up (so the rounding never exceeds the sensitivity)."""
        return int(math.ceil(self.scale * self.clip))

    @property
    def l2_sensitivity(self) -> float:
        """One example's rounded vector's L2 norm, at most: the units plus ``sqrt(K)`` (each coordinate moves by
        less than 1 in rounding); the units alone for one coordinate."""
        return self.noise().l2_sensitivity

    @property
    def l1_sensitivity(self) -> float:
        """The same vector's L1 norm, at most: ``sqrt(K)`` units plus ``K`` (the units for one coordinate)."""
        return self.noise().l1_sensitivity

    @property
    def node_variance(self) -> float:
        """The Skellam variance each node adds per coordinate."""
        return self.variance / self.threshold

    @property
    def noise_multiplier(self) -> float:
        """The central noise std over the L2 sensitivity: the Gaussian noise multiplier it compares with."""
        return math.sqrt(self.variance) / self.l2_sensitivity

    def epsilon(self, sample_rate: float, steps: int, delta: float, local: bool = False) -> float:
        """(epsilon at ``delta``) after ``steps`` steps: central (default) or local, as every accountant composes
        the noise record: one direction per step by the exact PLD of the one-coordinate mechanism; several by the
        RDP bound (the general sampling bound costs about 40% more noise than the PLD at the main job's
        settings)."""
        if steps == 0:
            return 0.0
        return noise_epsilon((StepRun(self.noise(local), sample_rate, steps),), delta)

    def field_limit(self, nodes: int) -> int:
        """The largest |value| a node may contribute per coordinate so that no sum of ``nodes`` contributions
        wraps around the field: a node whose clipped sum plus noise goes past it refuses the round instead (at
        gamma C = 3,200, the limit for 1,000 nodes is 4.6e15, a batch of 1.4e12 examples)."""
        return (1 << (FIELD_BITS - 1)) // max(nodes, 1) - 1

    def noise(self, local: bool = False) -> Skellam:
        """The central noise (or one node's share of it, ``local``) as the ledger header pins and every
        accountant composes it."""
        central = Skellam(self.variance, self.units, self.directions)
        return central.share(self.threshold) if local else central


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


def gaussian_ratio(plan: SkellamPlan, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The plan's noise multiplier over the PLD-calibrated Gaussian's for the same target: about 1 for one
    direction (the exact PLD), and for K directions what the RDP bound's general sampling amplification costs,
    which grows fast with the sampling rate (1.16 at q = 0.02, 4.2 at q = 0.25 over 250 steps at epsilon 3)."""
    return plan.noise_multiplier / calibrate_noise_multiplier(epsilon, delta, sample_rate, steps)


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
