"""Secret randomness for DP: noise on the released scalar and Poisson batch sampling.

Everything here draws from the operating system's CSPRNG (``os.urandom``), never from the public direction
seed: noise derived from a public seed could be regenerated and subtracted (a flaw of the DPZero reference
code). Only one noise value is drawn per step, so the cost of a true CSPRNG is negligible; Poisson sampling
needs one uniform per training example per step, a few hundred KB of entropy, also cheap.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class GaussianNoise:
    """Gaussian noise of standard deviation ``std`` added to the private scalar."""

    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.std) and self.std >= 0.0):
            raise ValueError(f"noise std must be finite and >= 0, got {self.std}")

    def sample(self, rng: SecureRandom) -> float:
        return float(rng.normal(1)[0] * self.std) if self.std > 0 else 0.0
