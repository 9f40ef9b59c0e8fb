"""Choosing the noise of the private scalar: the family and parameters with the least variance at a guarantee.

For a target (epsilon, delta), sampling rate q and number of steps, each family is scaled to the smallest
noise whose *accounted* epsilon (shared.privacy.accounting, PLD) is within the target: the Gaussian by dp-accounting's
calibration, the Laplace and every LMO shape by bisection on a scale factor. LMO-DP's family (Laplace with a
random inverse scale, a positive combination of Gamma, Exponential and Uniform variables) is searched over a
fixed grid of shapes. ``auto`` takes the smallest standard deviation; ties (within 1%) go to the family with
more mass within one clip bound, P(|X| <= 1), the second objective. Results are cached on disk per
configuration, since the LMO search costs minutes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from seedtune.shared.privacy.accounting import StepRun, calibrate_noise_multiplier, noise_epsilon
from seedtune.shared.task.config import ConfigError, PrivacyConfig, cache_root
from seedtune.shared.privacy.noise import CALIBRATED_FAMILIES, Noise

log = logging.getLogger(__name__)

CHOICES = CALIBRATED_FAMILIES + ("auto",)


def plan_noise(privacy: PrivacyConfig, sample_rate: float, steps: int, nodes_stop_at_budget: bool = False) -> Noise:
    """The run's noise: a fixed Gaussian multiplier if the config sets one, else the family calibrated so that
    ``steps`` steps at ``sample_rate`` spend at most (epsilon, delta). privacy.epsilon is the bound either way:
    a fixed multiplier that would spend more is refused by name (``seedtune train`` used to run past the target
    unannounced), except in a federation (``nodes_stop_at_budget``), whose nodes each refuse the instruction
    that would take their holder past its budget: there the run stops at the target instead."""
    if privacy.noise == "gaussian" and privacy.noise_multiplier:
        noise = Noise.gaussian(privacy.noise_multiplier)
        spent = noise_epsilon((StepRun(noise, sample_rate, steps),), privacy.delta)
        if spent > privacy.epsilon and not nodes_stop_at_budget:
            raise ConfigError(f"privacy.noise_multiplier {privacy.noise_multiplier:g} spends epsilon {spent:.4g} "
                              f"over {steps} steps at sampling rate {sample_rate:.4g}, more than privacy.epsilon "
                              f"{privacy.epsilon:g}: raise the multiplier, run fewer steps, or set privacy.epsilon "
                              f"to the budget you mean to spend")
        return noise
    target = Target(privacy.epsilon, privacy.delta, sample_rate, steps)
    return calibrate(privacy.noise, target)
# One example added to (or removed from) a held-out set moves its label's "examples" and its prediction's
# "predicted" count by 1, and its label's "correct" count by 1 if it was right: an L2 sensitivity of sqrt(3).
COUNT_SENSITIVITY = math.sqrt(3)


def count_noise(privacy: PrivacyConfig, epsilon: float) -> Noise:
    """The Gaussian of one release of held-out label counts (federation.node_eval_epsilon), as accounted: a
    unit-sensitivity multiplier; each count gets that multiplier times :data:`COUNT_SENSITIVITY` as its std."""
    return _gaussian(Target(epsilon, privacy.delta, 1.0, 1))


_CACHE_VERSION = 3  # 2: the sampler support gap in delta, Laplace mixtures by their density; 3: their boundary search rounds up
# (a_gamma, gamma_shape, a_exp, a_unif, unif_lo, unif_hi): from near-Laplace (narrow uniform) to heavy mixtures.
LMO_SHAPES = (
    (0.0, 4.0, 0.0, 1.0, 0.9, 1.1),
    (0.0, 4.0, 0.0, 1.0, 0.5, 1.5),
    (1.0, 16.0, 0.0, 0.0, 1.0, 1.0),
    (0.5, 8.0, 0.0, 0.5, 0.8, 1.2),
    (0.3, 4.0, 0.1, 0.6, 0.7, 1.3),
    (0.6, 4.0, 0.2, 0.2, 0.5, 1.5),
)


@dataclass(frozen=True)
class Target:
    epsilon: float
    delta: float
    sample_rate: float
    steps: int

    def key(self) -> str:
        text = json.dumps([_CACHE_VERSION, self.epsilon, self.delta, self.sample_rate, self.steps, LMO_SHAPES])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def accounted_epsilon(noise: Noise, target: Target) -> float:
    return noise_epsilon((StepRun(noise, target.sample_rate, target.steps),), target.delta)


def p_small(noise: Noise) -> float:
    """P(|X| <= 1): how often the noise stays within one clip bound."""
    return float(1.0 - 2.0 * noise.sf(np.asarray(1.0)))


def _scale_to_target(unit: Noise, target: Target, lo: float, hi: float, rel_tol: float = 3e-3) -> Noise:
    """Smallest multiple t of ``unit`` (bisection in log t) whose accounted epsilon meets the target."""
    while accounted_epsilon(unit.scaled(hi), target) > target.epsilon:
        lo, hi = hi, hi * 4
    while lo > 1e-6 and accounted_epsilon(unit.scaled(lo), target) <= target.epsilon:
        hi, lo = lo, lo / 4
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if accounted_epsilon(unit.scaled(mid), target) <= target.epsilon:
            hi = mid
        else:
            lo = mid
    return unit.scaled(hi)  # hi always meets the target


def calibrate(family: str, target: Target, progress: Callable[[str], None] | None = None) -> Noise:
    """The least-variance noise of one family (or ``auto``: of all) whose accounted epsilon meets the target."""
    if family not in CHOICES:
        raise ValueError(f"noise must be one of {CHOICES}, got {family!r}")
    if family in ("gaussian", "laplace") and _load(target) is None:  # no need for the LMO search
        gauss = _gaussian(target)
        return gauss if family == "gaussian" else _laplace(target, gauss)
    return search(target, progress)[family]


def _gaussian(target: Target) -> Noise:
    return Noise.gaussian(calibrate_noise_multiplier(target.epsilon, target.delta, target.sample_rate, target.steps))


def _laplace(target: Target, gauss: Noise) -> Noise:
    b0 = gauss.std / math.sqrt(2)  # a Laplace of the Gaussian's std: an upper bracket at many subsampled steps
    return _scale_to_target(Noise.laplace(1.0), target, b0 / 4, b0)


def quick(target: Target) -> dict[str, Noise]:
    """The Gaussian and the Laplace for ``target`` (seconds), or every family if a full search is cached:
    what ``seedtune noise-search`` answers without ``--lmo``."""
    cached = _load(target)
    if cached is not None:
        return cached
    gauss = _gaussian(target)
    return {"gaussian": gauss, "laplace": _laplace(target, gauss)}


def search(target: Target, progress: Callable[[str], None] | None = None) -> dict[str, Noise]:
    cached = _load(target)
    if cached is not None:
        return cached
    say = progress or log.info
    gauss = _gaussian(target)
    say(f"gaussian: {gauss.describe()}")
    laplace = _laplace(target, gauss)
    say(f"laplace: {laplace.describe()}")
    lmos = []
    for shape in LMO_SHAPES:
        unit = Noise.lmo(*shape)
        unit = unit.scaled(laplace.std / unit.std)  # start from the Laplace's std
        noise = _scale_to_target(unit, target, 0.5, 2.0)
        say(f"lmo {shape}: std {noise.std:.4g}")
        lmos.append(noise)
    found = {"gaussian": gauss, "laplace": laplace, "lmo": min(lmos, key=lambda n: n.std)}  # the first smallest
    found["auto"] = pick(found.values())
    _store(target, found)
    return found


def pick(noises) -> Noise:
    noises = list(noises)
    best = min(n.std for n in noises)
    close = [n for n in noises if n.std <= best * 1.01]
    return max(close, key=p_small)


# ---------------------------------------------------------------------------------------------- cache
def _cache_path(target: Target) -> Path:
    return cache_root() / "noise" / f"{target.key()}.json"


def _load(target: Target) -> dict[str, Noise] | None:
    path = _cache_path(target)
    if not path.is_file():
        return None
    try:
        found = {k: Noise.from_json(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable noise cache entry %s", path)
        return None
    # The cache holds choices, not guarantees: re-account them with this code's accountant, so an entry made by
    # another version (or edited by hand) can never yield a noise above the target.
    if set(found) != set(CHOICES) or any(accounted_epsilon(n, target) > target.epsilon for n in found.values()):
        log.warning("noise cache entry %s does not meet the target under the current accountant; searching again",
                    path)
        return None
    return found


def _store(target: Target, found: dict[str, Noise]) -> None:
    path = _cache_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never share a tmp
        tmp.write_text(json.dumps({k: v.to_json() for k, v in found.items()}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the noise search in %s: %s", path, exc)
