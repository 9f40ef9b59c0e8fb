"""Renyi DP for the one mechanism no PLD here covers: a K-dimensional Skellam release (secure aggregation with K
directions per step), amplified by Poisson sampling.

The exact PLD of a subsampled mechanism needs its two output distributions; a K-coordinate Skellam vector's
worst neighbouring pair is not known in closed form, so its guarantee is the RDP bound of Agarwal, Kairouz and Liu
(2021, Corollary 3.6) under Zhu and Wang's general sampling bound (ICML 2019, Theorem 5, integer orders), composed
over steps and converted to (epsilon, delta) by dp-accounting. Every other noise is accounted by its PLD
(shared.privacy.accounting); this module imports nothing of seedtune's so that the noise records can own their
curves.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.special import gammaln, logsumexp

ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512)  # integer RDP orders (the sampling bound needs them)


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


@functools.lru_cache(maxsize=256)
def subsampled_skellam_curve(l1: float, l2: float, variance: float, rate: float) -> np.ndarray:
    """One subsampled Skellam release's RDP over :data:`ORDERS` (cached: every budget check of every holder asks
    for the same curve; read-only, so that no caller can change the cached copy)."""
    curve = np.array([subsampled_rdp(a, rate, lambda o: skellam_rdp(o, l1, l2, variance)) for a in ORDERS])
    curve.setflags(write=False)
    return curve


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon at ``delta``) of an RDP curve over :data:`ORDERS`, by dp-accounting's conversion."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, delta)[0])
