"""A toy noise family, to show what a new one takes: this file (sampling, density, tail, its record) and the
``register_noise`` line. The accountant builds its PLD from the density (shared.privacy.accounting.noise_pld), which the
logistic allows: it is log-concave, so log p(x-1)/p(x) is monotone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from seedtune.shared.privacy.noise import LAPLACE_SUPPORT, Noise, SecureRandom, register_noise


@register_noise("logistic")
@dataclass(frozen=True)
class Logistic(Noise):
    """Logistic(0, scale): density e^(-|x|/s) / (s (1 + e^(-|x|/s))^2)."""

    scale: float
    family = "logistic"

    def sample(self, rng: SecureRandom, n: int) -> np.ndarray:
        u = rng.uniform(n)
        return self.scale * (np.log(u) - np.log1p(-u))

    def scaled(self, factor: float) -> "Logistic":
        return Logistic(self.scale * factor)

    @property
    def std(self) -> float:
        return self.scale * math.pi / math.sqrt(3.0)

    def describe(self) -> str:
        return f"logistic(s={self.scale:.4g})"

    def support_gap(self) -> float:
        return 2.0 * float(expit(-LAPLACE_SUPPORT))  # log(u / (1 - u)) reaches -log(MIN_UNIFORM) at most

    def tail_bound(self, mass: float) -> float:
        return self.scale * math.log(1.0 / mass - 1.0)

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        a = np.abs(np.asarray(x, dtype=np.float64)) / self.scale
        return -a - math.log(self.scale) - 2.0 * np.log1p(np.exp(-a))

    def sf(self, x: np.ndarray) -> np.ndarray:
        return expit(-np.asarray(x, dtype=np.float64) / self.scale)

    def _record(self) -> dict[str, Any]:
        return {"scale": self.scale}

    @classmethod
    def from_record(cls, family: str, record: dict[str, Any]) -> "Logistic":
        return cls(float(record["scale"]))
