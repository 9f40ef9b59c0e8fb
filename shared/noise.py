"""Secret randomness for DP: noise on the released scalar and Poisson batch sampling.

Everything here draws from the operating system's CSPRNG (``os.urandom``), never from the public direction
seed: noise derived from a public seed could be regenerated and subtracted (a flaw of the DPZero reference
code). Only one noise value is drawn per step, so the cost of a true CSPRNG is negligible; Poisson sampling
needs one uniform per training example per step, a few hundred KB of entropy, also cheap.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np


class SecureRandom:
    """Uniform, Gaussian and Bernoulli draws from ``os.urandom`` (53-bit uniforms in (0, 1))."""

    def uniform(self, n: int) -> np.ndarray:
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, n: int) -> np.ndarray:
        """Box-Muller on CSPRNG uniforms."""
        u1, u2 = self.uniform(n), self.uniform(n)
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)

    def poisson_sample(self, population: int, rate: float) -> np.ndarray:
        """Indices of a Poisson sample: each of ``population`` items kept independently with ``rate``."""
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
        return np.flatnonzero(self.uniform(population) < rate)

    def seed64(self) -> int:
        """A fresh 64-bit seed, e.g. for a public direction (unpredictable before it is announced)."""
        return int.from_bytes(os.urandom(8), "little")


NOISE_FAMILIES = ("gaussian", "laplace", "lmo")
_LMO_ATOMS = 16  # quantile atoms of the LMO inverse-scale distribution
_LMO_DRAWS = 200_000  # public, fixed-seed draws used to place them


@dataclass(frozen=True)
class Noise:
    """Noise for a sensitivity-1 release: the private sum gets ``clip * noise.sample()``.

    ``gaussian``: N(0, sigma^2). ``laplace`` and ``lmo``: a finite mixture of Laplace(0, 1/rate_j) with weights
    w_j (one atom for Laplace). The LMO-DP family draws the Laplace inverse scale from a positive combination
    of Gamma, Exponential and Uniform variables; that distribution is replaced by ``_LMO_ATOMS`` quantile atoms,
    and it is exactly this finite mixture that is both sampled and accounted, so the accountant describes the
    sampler with no approximation. Hashable, so accounting results can be cached per noise.
    """

    family: str
    sigma: float = 0.0
    rates: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    recipe: tuple[float, ...] = ()  # lmo: (a_gamma, gamma_shape, a_exp, a_unif, unif_lo, unif_hi, scale)

    def __post_init__(self) -> None:
        if self.family not in NOISE_FAMILIES:
            raise ValueError(f"noise family must be one of {NOISE_FAMILIES}, got {self.family!r}")
        if self.family == "gaussian":
            if not (math.isfinite(self.sigma) and self.sigma >= 0.0):
                raise ValueError(f"gaussian noise multiplier must be finite and >= 0, got {self.sigma}")
        elif not (self.rates and len(self.rates) == len(self.weights)
                  and all(math.isfinite(r) and r > 0 for r in self.rates)
                  and all(w > 0 for w in self.weights) and abs(sum(self.weights) - 1) < 1e-9):
            raise ValueError(f"{self.family} noise needs positive rates and weights summing to 1, got "
                             f"{self.rates} / {self.weights}")

    # ---------------------------------------------------------------------------------- constructors
    @classmethod
    def gaussian(cls, sigma: float) -> "Noise":
        return cls("gaussian", sigma=float(sigma))

    @classmethod
    def laplace(cls, scale: float) -> "Noise":
        return cls("laplace", rates=(1.0 / scale,), weights=(1.0,))

    @classmethod
    def lmo(cls, a_gamma: float, gamma_shape: float, a_exp: float, a_unif: float, unif_lo: float, unif_hi: float,
            scale: float = 1.0) -> "Noise":
        """Inverse scale ``scale * (a_gamma * Gamma(k, 1/k) + a_exp * Exp(1) + a_unif * U(lo, hi))``."""
        if min(a_gamma, a_exp, a_unif) < 0 or a_gamma + a_exp + a_unif <= 0 or not 0 < unif_lo <= unif_hi:
            raise ValueError("LMO weights must be >= 0 with a positive sum, and 0 < unif_lo <= unif_hi")
        rng = np.random.default_rng(20240531)  # public: only places the atoms of a public distribution
        lam = (a_gamma * rng.gamma(gamma_shape, 1.0 / gamma_shape, _LMO_DRAWS)
               + a_exp * rng.exponential(1.0, _LMO_DRAWS) + a_unif * rng.uniform(unif_lo, unif_hi, _LMO_DRAWS))
        atoms = np.quantile(lam, (np.arange(_LMO_ATOMS) + 0.5) / _LMO_ATOMS) * scale
        return cls("lmo", rates=tuple(float(a) for a in atoms), weights=(1.0 / _LMO_ATOMS,) * _LMO_ATOMS,
                   recipe=(a_gamma, gamma_shape, a_exp, a_unif, unif_lo, unif_hi, scale))

    def scaled(self, factor: float) -> "Noise":
        """The same family, multiplied by ``factor`` (larger = more noise)."""
        if self.family == "gaussian":
            return Noise.gaussian(self.sigma * factor)
        recipe = self.recipe[:-1] + (self.recipe[-1] / factor,) if self.recipe else ()
        return Noise(self.family, rates=tuple(r / factor for r in self.rates), weights=self.weights, recipe=recipe)

    # ------------------------------------------------------------------------------------- moments
    @property
    def std(self) -> float:
        if self.family == "gaussian":
            return self.sigma
        return math.sqrt(sum(w * 2.0 / r**2 for r, w in zip(self.rates, self.weights)))

    def describe(self) -> str:
        if self.family == "gaussian":
            return f"gaussian(sigma={self.sigma:.4g})"
        if self.family == "laplace":
            return f"laplace(b={1 / self.rates[0]:.4g})"
        return f"lmo(recipe={tuple(round(x, 4) for x in self.recipe)}, std={self.std:.4g})"

    # ------------------------------------------------------------------------------------ sampling
    def sample(self, rng: SecureRandom, n: int = 1) -> np.ndarray:
        if self.family == "gaussian":
            return rng.normal(n) * self.sigma if self.sigma > 0 else np.zeros(n)
        atom = np.searchsorted(np.cumsum(self.weights), rng.uniform(n) * sum(self.weights))
        atom = np.minimum(atom, len(self.rates) - 1)
        u, side = rng.uniform(n), rng.uniform(n)
        magnitude = -np.log(u) / np.asarray(self.rates)[atom]  # Exp(rate): |Laplace|
        return np.where(side < 0.5, -magnitude, magnitude)

    # ------------------------------------------------------------------------------------- density
    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.family == "gaussian":
            return -0.5 * (x / self.sigma) ** 2 - math.log(self.sigma * math.sqrt(2 * math.pi))
        rates, logw = np.asarray(self.rates), np.log(self.weights)
        terms = logw + np.log(rates / 2) - np.abs(x)[..., None] * rates
        return _logsumexp(terms)

    def sf(self, x: np.ndarray) -> np.ndarray:
        """P(X > x), accurate in the upper tail."""
        x = np.asarray(x, dtype=np.float64)
        if self.family == "gaussian":
            from scipy.special import ndtr

            return ndtr(-x / self.sigma)
        rates, w = np.asarray(self.rates), np.asarray(self.weights)
        upper = 0.5 * np.exp(-np.abs(x)[..., None] * rates) @ w  # P(X > |x|)
        return np.where(x >= 0, upper, 1.0 - upper)

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """P(X <= x), accurate in the lower tail (the noise is symmetric)."""
        return self.sf(-np.asarray(x, dtype=np.float64))

    # ----------------------------------------------------------------------------------- records
    def to_json(self) -> str:
        return json.dumps({"family": self.family, "sigma": self.sigma, "rates": list(self.rates),
                           "weights": list(self.weights), "recipe": list(self.recipe)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Noise":
        d = json.loads(text)
        return cls(d["family"], float(d.get("sigma", 0.0)), tuple(d.get("rates", ())), tuple(d.get("weights", ())),
                   tuple(d.get("recipe", ())))


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1)
    return m + np.log(np.exp(a - m[..., None]).sum(axis=-1))
