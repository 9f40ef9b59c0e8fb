"""Secret randomness for DP: noise on the released scalar and Poisson batch sampling.

Everything here draws from a cryptographically secure generator, never from the public direction seed:
noise derived from a public seed could be regenerated and subtracted (a flaw of the DPZero reference code).
The generator is a ChaCha20 keystream keyed with 256 bits from the operating system's CSPRNG
(``os.urandom``), re-keyed in a forked child: as unpredictable as ``os.urandom`` and fast enough (about a GB/s)
for what needs many draws, the Poisson sampling of every training example and the DP-SGD baseline's noise on
every trainable weight.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from seedtune.shared.privacy.rdp import subsampled_skellam_curve


class SecureRandom:
    """Uniform, Gaussian and Bernoulli draws from ``os.urandom``.

    Uniforms reach every binade of (0, 1) down to 2^-1074 (a 52-bit mantissa times 2^-(k+1), k counted in
    leading zero bits), not only multiples of 2^-53: a draw ``-log(u)`` then reaches 744 instead of 37.4, so
    Box-Muller's Gaussian reaches 38.6 sigma instead of 8.65. The ideal noise's mass beyond the sampler's
    support (:meth:`Noise.support_gap`) is below 1e-300, which no accountant needs to add to delta (a
    53-bit uniform left 5e-18 per draw uncounted, and 2^-54 of the Laplace's)."""

    # ChaCha20's block counter is 32 bits: one key and nonce give 2^32 blocks of 64 bytes (256 GiB). The stream
    # starts its counter at 0 and is keyed afresh well before the end.
    REKEY_BYTES = 2**37

    def __init__(self) -> None:
        self._pid = -1
        self._used = 0

    def _bytes(self, n: int) -> bytes:
        """``n`` secret random bytes: the keystream, keyed afresh from os.urandom in each process and every
        :data:`REKEY_BYTES`. (The nonce's first 4 bytes are the block counter: a random counter near 2^32
        would end the stream after a few bytes, which a long run hit.)"""
        if self._pid != os.getpid() or self._used + n > self.REKEY_BYTES:  # a fork must not replay its parent's
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

            key = os.urandom(32)
            nonce = bytes(4) + os.urandom(12)  # counter 0, a random 96-bit nonce
            self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
            self._pid, self._used = os.getpid(), 0
        self._used += n
        return self._stream.update(bytes(n))

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._bytes(8 * n), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        mantissa = self._words(n) >> np.uint64(12)  # 52 bits
        binade = np.zeros(n, dtype=np.int64)  # u in [2^-(k+1), 2^-k)
        pending = np.arange(n)
        while pending.size and binade.max(initial=0) < _MAX_BINADE:
            bits = self._words(pending.size) >> np.uint64(11)  # 53 exact bits
            found = bits != 0
            length = np.frexp(bits[found].astype(np.float64))[1]  # bit length: exact, the integers are < 2^53
            binade[pending[found]] += 53 - length
            binade[pending[~found]] += 53
            pending = pending[~found]
        binade = np.minimum(binade, _MAX_BINADE)
        return np.ldexp(1.0 + mantissa.astype(np.float64) * 2.0**-52, -(binade + 1).astype(np.int32))

    def normal(self, n: int) -> np.ndarray:
        """Box-Muller on CSPRNG uniforms: the radius from a full-range uniform, the angle from 53 bits."""
        u1 = self.uniform(n)
        u2 = (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)

    def poisson_sample(self, population: int, rate: float) -> np.ndarray:
        """Indices of a Poisson sample: each of ``population`` items kept independently with ``rate``."""
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
        return np.flatnonzero(self.uniform(population) < rate)

    def poisson(self, lam: float, n: int) -> np.ndarray:
        """``n`` Poisson(``lam``) draws (int64) on this stream's uniforms, by the algorithms numpy uses: products of
        uniforms below mean 10, Hormann's transformed rejection (PTRS, 1993) above. Exact up to float64
        arithmetic, as numpy's are; the Skellam noise of secure aggregation (shared.privacy.skellam) is their
        difference."""
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"Poisson mean must be finite and >= 0, got {lam}")
        out = np.zeros(n, dtype=np.int64)
        if lam == 0 or n == 0:
            return out
        pending = np.arange(n)
        if lam < 10:
            limit, prod = math.exp(-lam), np.ones(n)
            while pending.size:
                prod[pending] *= self.uniform(pending.size)
                going = prod[pending] > limit
                out[pending[going]] += 1
                pending = pending[going]
            return out
        from scipy.special import gammaln

        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2)
        while pending.size:
            u, v = self.uniform(pending.size) - 0.5, self.uniform(pending.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            possible = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
            kk = np.where(possible, k, 0.0)
            slow = possible & (np.log(v) + log_inv_alpha - np.log(a / (us * us) + b)
                               <= -lam + kk * loglam - gammaln(kk + 1))
            done = quick | slow
            out[pending[done]] = k[done].astype(np.int64)
            pending = pending[~done]
        return out

    def noise(self, noise: "Noise", n: int = 1) -> np.ndarray:
        """``n`` draws of the noise that ``noise`` describes (the description holds no randomness of its own)."""
        return noise.sample(self, n)

    def seed64(self) -> int:
        """A fresh 64-bit seed, e.g. for a public direction (unpredictable before it is announced)."""
        return int.from_bytes(self._bytes(8), "little")


_MAX_BINADE = 1021  # 2^-1022 is the smallest normal double: u never underflows
MIN_UNIFORM = 2.0**-(_MAX_BINADE + 1)
GAUSSIAN_SUPPORT = math.sqrt(-2.0 * math.log(MIN_UNIFORM))  # the largest |Box-Muller draw| / sigma: 37.6
LAPLACE_SUPPORT = -math.log(MIN_UNIFORM)  # the largest |Laplace draw| x rate: 708

_LMO_ATOMS = 16  # quantile atoms of the LMO inverse-scale distribution
_LMO_DRAWS = 200_000  # public, fixed-seed draws used to place them

NOISE_FAMILIES: dict[str, type["Noise"]] = {}  # family name -> class: what a ledger's noise record can name
# what privacy.noise names: shared.privacy.noise_search calibrates them
CALIBRATED_FAMILIES = ("gaussian", "laplace", "lmo")


def register_noise(*families: str) -> Callable[[type["Noise"]], type["Noise"]]:
    """Class decorator: ``families`` are serialised by, and read back as, this class. A new noise family is one
    class (sampling, density, tail, PLD if dp-accounting has one) and this one line."""
    def add(cls: type["Noise"]) -> type["Noise"]:
        for family in families:
            if family in NOISE_FAMILIES:
                raise ValueError(f"noise family {family!r} is already registered")
            NOISE_FAMILIES[family] = cls
        return cls
    return add


class Noise:
    """The description of a noise for a sensitivity-1 release (the private sum gets ``clip * rng.noise(noise)``,
    drawn by :meth:`SecureRandom.noise`): what the ledger header pins and the accountant composes. Subclasses
    are frozen dataclasses (hashable, so accounting results can be cached per noise); each owns its sampling,
    density and tail, and its PLD where dp-accounting has one (else :func:`shared.privacy.accounting.noise_pld`
    builds one from the density, which needs log p(x-1)/p(x) monotone on (-inf, 0], [0, 1] and [1, inf))."""

    family: str

    # ---------------------------------------------------------------------------------- constructors
    @staticmethod
    def gaussian(sigma: float) -> "Gaussian":
        return Gaussian(float(sigma))

    @staticmethod
    def laplace(scale: float) -> "LaplaceMixture":
        return LaplaceMixture("laplace", rates=(1.0 / scale,), weights=(1.0,))

    @staticmethod
    def lmo(a_gamma: float, gamma_shape: float, a_exp: float, a_unif: float, unif_lo: float, unif_hi: float,
            scale: float = 1.0) -> "LaplaceMixture":
        """LMO-DP: a Laplace whose inverse scale is ``scale * (a_gamma * Gamma(k, 1/k) + a_exp * Exp(1) + a_unif *
        U(lo, hi))``, that distribution replaced by ``_LMO_ATOMS`` quantile atoms: it is exactly this finite
        mixture that is both sampled and accounted, so the accountant describes the sampler with no
        approximation."""
        if min(a_gamma, a_exp, a_unif) < 0 or a_gamma + a_exp + a_unif <= 0 or not 0 < unif_lo <= unif_hi:
            raise ValueError("LMO weights must be >= 0 with a positive sum, and 0 < unif_lo <= unif_hi")
        rng = np.random.default_rng(20240531)  # public: only places the atoms of a public distribution
        lam = (a_gamma * rng.gamma(gamma_shape, 1.0 / gamma_shape, _LMO_DRAWS)
               + a_exp * rng.exponential(1.0, _LMO_DRAWS) + a_unif * rng.uniform(unif_lo, unif_hi, _LMO_DRAWS))
        atoms = np.quantile(lam, (np.arange(_LMO_ATOMS) + 0.5) / _LMO_ATOMS) * scale
        return LaplaceMixture("lmo", rates=tuple(float(a) for a in atoms), weights=(1.0 / _LMO_ATOMS,) * _LMO_ATOMS,
                              recipe=(a_gamma, gamma_shape, a_exp, a_unif, unif_lo, unif_hi, scale))

    # ------------------------------------------------------------------------------- what a family owns
    def sample(self, rng: "SecureRandom", n: int) -> np.ndarray:
        """``n`` draws from the CSPRNG ``rng``."""
        raise NotImplementedError

    def scaled(self, factor: float) -> "Noise":
        """The same family, multiplied by ``factor`` (larger = more noise)."""
        raise NotImplementedError

    @property
    def std(self) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def support_gap(self) -> float:
        """Mass the ideal distribution puts beyond what :meth:`sample` can draw: the total variation between the
        sampled and the accounted noise, per draw, from the support cut."""
        raise NotImplementedError

    def tail_bound(self, mass: float) -> float:
        """A ``t`` with P(X > t) at most ``mass``: where a density-built PLD may stop."""
        raise NotImplementedError

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sf(self, x: np.ndarray) -> np.ndarray:
        """P(X > x), accurate in the upper tail."""
        raise NotImplementedError

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """P(X <= x), accurate in the lower tail (every family here is symmetric)."""
        return self.sf(-np.asarray(x, dtype=np.float64))

    def builtin_pld(self, sample_rate: float, interval: float, connect_dots: bool = True) -> Any:
        """dp-accounting's own PLD of one Poisson-subsampled release, or None where it has none."""
        return None

    @property
    def accounted_by_rdp(self) -> bool:
        """Whether no PLD here covers this noise's release (the K-dimensional Skellam), so the accountant composes
        its :meth:`rdp_curve` instead."""
        return False

    def rdp_curve(self, sample_rate: float) -> np.ndarray:
        """One Poisson-subsampled release's RDP over shared.privacy.rdp.ORDERS, for a noise
        :attr:`accounted_by_rdp`."""
        raise ValueError(f"{self.describe()} is accounted by its PLD, not by an RDP curve")

    def gaussian_sigma(self) -> float | None:
        """The noise multiplier where this is a Gaussian (the RDP cross-check covers those only), else None."""
        return None

    # ----------------------------------------------------------------------------------- records
    def _record(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps({"family": self.family, **self._record()}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Noise":
        d = json.loads(text)
        family = d["family"]
        if family not in NOISE_FAMILIES:
            raise ValueError(f"noise family must be one of {tuple(NOISE_FAMILIES)}, got {family!r}")
        return NOISE_FAMILIES[family].from_record(family, d)

    @classmethod
    def from_record(cls, family: str, record: dict[str, Any]) -> "Noise":
        raise NotImplementedError


@register_noise("skellam")
@dataclass(frozen=True)
class Skellam(Noise):
    """Symmetric Skellam noise of ``variance`` per coordinate on integer vectors of ``directions`` coordinates (one
    step's K directions) in units of ``clip / sensitivity``: the central noise of a secure-aggregation round
    (shared.privacy.skellam), which t nodes each add a t-th of.

    Each example's clipped vector is rounded at random per coordinate, so one example moves the integer sum by at
    most ``sensitivity`` for one coordinate (a value in [-S, S] rounds within it), and for K coordinates by at most
    ``sensitivity + sqrt(K)`` in L2 and ``sqrt(K) sensitivity + K`` in L1 (each coordinate's rounding moves it by
    less than 1). At sensitivity 1 it is that integer noise divided by ``sensitivity``. One coordinate's PLD is
    exact, built from the two output distributions of the subsampled mechanism; K coordinates have no PLD here, and
    are accounted by their RDP bound (shared.privacy.rdp)."""

    variance: float
    sensitivity: int
    directions: int = 1
    family = "skellam"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.variance) and self.variance > 0):
            raise ValueError(f"skellam variance must be finite and > 0, got {self.variance}")
        if not (isinstance(self.sensitivity, int) and self.sensitivity >= 1):
            raise ValueError(f"skellam sensitivity must be an integer >= 1, got {self.sensitivity!r}")
        if not (isinstance(self.directions, int) and self.directions >= 1):
            raise ValueError(f"skellam directions must be an integer >= 1, got {self.directions!r}")

    @property
    def l2_sensitivity(self) -> float:
        """How far one example moves the integer sum, in L2, whatever the rounding coins."""
        return float(self.sensitivity) + (math.sqrt(self.directions) if self.directions > 1 else 0.0)

    @property
    def l1_sensitivity(self) -> float:
        """The same in L1."""
        if self.directions == 1:
            return float(self.sensitivity)
        return math.sqrt(self.directions) * self.sensitivity + self.directions

    def share(self, parts: int) -> "Skellam":
        """What one of ``parts`` nodes adds (a ``parts``-th of the variance; ``parts`` of them sum to this noise):
        the noise that alone protects a node's release if the secure sum fails (its local guarantee)."""
        return replace(self, variance=self.variance / parts)

    def sample(self, rng: "SecureRandom", n: int) -> np.ndarray:
        return self.integers(rng, n, self.variance) / self.sensitivity

    @staticmethod
    def integers(rng: "SecureRandom", n: int, variance: float) -> np.ndarray:
        """``n`` integer draws of variance ``variance``: Poisson(variance/2) - Poisson(variance/2)."""
        return rng.poisson(variance / 2, n) - rng.poisson(variance / 2, n)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) / self.sensitivity

    def describe(self) -> str:
        k = f", directions={self.directions}" if self.directions > 1 else ""
        return f"skellam(variance={self.variance:.6g}, sensitivity={self.sensitivity}{k})"

    def support_gap(self) -> float:
        return 0.0  # the Poisson draws reach every integer an int64 holds

    def builtin_pld(self, sample_rate: float, interval: float, connect_dots: bool = True) -> Any:
        """Both directions of add/remove, from the pmfs over 20 standard deviations each side (the mass beyond,
        below 1e-88, is past float64's reach); outcomes rarer than e^-60 count as an infinite loss (pessimistic:
        their mass goes to delta). One coordinate only: K coordinates are accounted by :meth:`rdp_curve`."""
        if self.directions > 1:
            return None
        from dp_accounting.pld import privacy_loss_distribution as pld_lib
        from scipy.stats import skellam

        half = self.variance / 2
        width = int(math.ceil(20 * math.sqrt(self.variance))) + self.sensitivity
        support = np.arange(-width, width + 1)
        base = skellam.logpmf(support, half, half)
        shifted = skellam.logpmf(support - self.sensitivity, half, half)
        mixed = shifted if sample_rate >= 1 else np.logaddexp(math.log1p(-sample_rate) + base,
                                                               math.log(sample_rate) + shifted)
        return pld_lib.from_two_probability_mass_functions(
            {int(x): float(v) for x, v in zip(support, base)}, {int(x): float(v) for x, v in zip(support, mixed)},
            value_discretization_interval=interval, log_mass_truncation_bound=-60.0, symmetric=False)

    @property
    def accounted_by_rdp(self) -> bool:
        return self.directions > 1

    def rdp_curve(self, sample_rate: float) -> np.ndarray:
        if not self.accounted_by_rdp:
            return super().rdp_curve(sample_rate)
        return subsampled_skellam_curve(self.l1_sensitivity, self.l2_sensitivity, self.variance, sample_rate)

    def _record(self) -> dict[str, Any]:
        # one direction keeps the record it always had, so the headers (and digests) of such ledgers do not move
        extra = {"directions": self.directions} if self.directions > 1 else {}
        return {"variance": self.variance, "sensitivity": self.sensitivity, **extra}

    @classmethod
    def from_record(cls, family: str, record: dict[str, Any]) -> "Skellam":
        return cls(float(record["variance"]), int(record["sensitivity"]), int(record.get("directions", 1)))


@register_noise("gaussian")
@dataclass(frozen=True)
class Gaussian(Noise):
    """N(0, sigma^2)."""

    sigma: float
    family = "gaussian"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0.0):
            raise ValueError(f"gaussian noise multiplier must be finite and >= 0, got {self.sigma}")

    def sample(self, rng: "SecureRandom", n: int) -> np.ndarray:
        return rng.normal(n) * self.sigma if self.sigma > 0 else np.zeros(n)

    def scaled(self, factor: float) -> "Gaussian":
        return Gaussian(float(self.sigma * factor))

    @property
    def std(self) -> float:
        return self.sigma

    def describe(self) -> str:
        return f"gaussian(sigma={self.sigma:.4g})"

    def support_gap(self) -> float:
        from scipy.special import ndtr

        return float(2.0 * ndtr(-GAUSSIAN_SUPPORT))

    def tail_bound(self, mass: float) -> float:
        return 9.5 * self.sigma  # P(X > 9.5 sigma) ~ 1e-21, below any mass asked here (1e-18)

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return -0.5 * (x / self.sigma) ** 2 - math.log(self.sigma * math.sqrt(2 * math.pi))

    def sf(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import ndtr

        return ndtr(-np.asarray(x, dtype=np.float64) / self.sigma)

    def builtin_pld(self, sample_rate: float, interval: float, connect_dots: bool = True) -> Any:
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        return pld_lib.from_gaussian_mechanism(self.sigma, value_discretization_interval=interval,
                                               sampling_prob=sample_rate, use_connect_dots=connect_dots)

    def gaussian_sigma(self) -> float | None:
        return self.sigma

    def _record(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "rates": [], "weights": [], "recipe": []}

    @classmethod
    def from_record(cls, family: str, record: dict[str, Any]) -> "Gaussian":
        return cls(float(record.get("sigma", 0.0)))


@register_noise("laplace", "lmo")
@dataclass(frozen=True)
class LaplaceMixture(Noise):
    """A finite mixture of Laplace(0, 1/rate_j) with weights w_j: one atom for ``laplace``, LMO-DP's quantile atoms
    for ``lmo`` (:meth:`Noise.lmo`, whose arguments ``recipe`` keeps)."""

    family: str  # an instance field here: "laplace" or "lmo"
    rates: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    recipe: tuple[float, ...] = ()  # lmo: (a_gamma, gamma_shape, a_exp, a_unif, unif_lo, unif_hi, scale)

    def __post_init__(self) -> None:
        if not (self.rates and len(self.rates) == len(self.weights)
                and all(math.isfinite(r) and r > 0 for r in self.rates)
                and all(w > 0 for w in self.weights) and abs(sum(self.weights) - 1) < 1e-9):
            raise ValueError(f"{self.family} noise needs positive rates and weights summing to 1, got "
                             f"{self.rates} / {self.weights}")

    def sample(self, rng: "SecureRandom", n: int) -> np.ndarray:
        atom = np.searchsorted(np.cumsum(self.weights), rng.uniform(n) * sum(self.weights))
        atom = np.minimum(atom, len(self.rates) - 1)
        u, side = rng.uniform(n), rng.uniform(n)
        magnitude = -np.log(u) / np.asarray(self.rates)[atom]  # Exp(rate): |Laplace|
        return np.where(side < 0.5, -magnitude, magnitude)

    def scaled(self, factor: float) -> "LaplaceMixture":
        recipe = self.recipe[:-1] + (self.recipe[-1] / factor,) if self.recipe else ()
        return LaplaceMixture(self.family, rates=tuple(r / factor for r in self.rates), weights=self.weights,
                              recipe=recipe)

    @property
    def std(self) -> float:
        return math.sqrt(sum(w * 2.0 / r**2 for r, w in zip(self.rates, self.weights)))

    def describe(self) -> str:
        if self.family == "laplace":
            return f"laplace(b={1 / self.rates[0]:.4g})"
        return f"lmo(recipe={tuple(round(x, 4) for x in self.recipe)}, std={self.std:.4g})"

    def support_gap(self) -> float:
        return math.exp(-LAPLACE_SUPPORT)  # every atom: P(|Lap(1/r)| > LAPLACE_SUPPORT / r)

    def tail_bound(self, mass: float) -> float:
        return math.log(0.5 / mass) / min(self.rates)  # the widest atom's P(X > t) = exp(-rate t) / 2

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        rates, logw = np.asarray(self.rates), np.log(self.weights)
        terms = logw + np.log(rates / 2) - np.abs(x)[..., None] * rates
        return _logsumexp(terms)

    def sf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        rates, w = np.asarray(self.rates), np.asarray(self.weights)
        upper = 0.5 * np.exp(-np.abs(x)[..., None] * rates) @ w  # P(X > |x|)
        return np.where(x >= 0, upper, 1.0 - upper)

    def builtin_pld(self, sample_rate: float, interval: float, connect_dots: bool = True) -> Any:
        """A single Laplace only: a mixture is sampled as a mixture, so it is accounted as one (by its density),
        never as its first atom."""
        if self.family != "laplace" or len(self.rates) != 1:
            return None
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        return pld_lib.from_laplace_mechanism(1.0 / self.rates[0], value_discretization_interval=interval,
                                              sampling_prob=sample_rate, use_connect_dots=connect_dots)

    def _record(self) -> dict[str, Any]:
        return {"sigma": 0.0, "rates": list(self.rates), "weights": list(self.weights), "recipe": list(self.recipe)}

    @classmethod
    def from_record(cls, family: str, record: dict[str, Any]) -> "LaplaceMixture":
        """Every number read as a float (a record that holds anything else raises TypeError or ValueError)."""
        def floats(key: str) -> tuple[float, ...]:
            return tuple(float(x) for x in record.get(key, ()))
        return cls(family, floats("rates"), floats("weights"), floats("recipe"))


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1)
    return m + np.log(np.exp(a - m[..., None]).sum(axis=-1))
