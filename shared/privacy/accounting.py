"""Privacy accounting: typed dp-accounting events, composed explicitly, evaluated with the PLD accountant.

Every epsilon seedtune reports comes from :class:`PrivacyAccountant` (privacy loss distributions, the
tightest valid bound measured in DESIGN.md section 4), except the one mechanism no PLD here covers, a
K-dimensional Skellam release under secure aggregation, whose RDP bound (shared.privacy.rdp) is composed with the
rest (:func:`noise_epsilon`). RDP is offered as a looser cross-check; Opacus' GDP
accountant is never used because it is an approximation, not a bound.

Steps are recorded as runs of identical steps: one ``SelfComposedDpEvent`` per (noise, rate) run rather than
one event per step, which makes a 10,000-step epsilon take a fraction of a second.
Neighbouring datasets differ by adding or removing one example, matching Poisson sampling with the clipped
sum divided by the *expected* batch size (sensitivity C / (q n)).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from seedtune.shared.privacy.noise import Noise
from seedtune.shared.privacy.rdp import rdp_to_epsilon

_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
_PLD_DISCRETIZATION = 1e-4
MIN_NOISE_MULTIPLIER = 0.25


def gaussian_step(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    """One Poisson-subsampled Gaussian step: noise std = noise_multiplier x sensitivity."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    inner = dp_accounting.GaussianDpEvent(noise_multiplier)
    return inner if sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate, inner)


@dataclass(frozen=True)
class StepRun:
    """``count`` identical private steps: each a release with ``noise`` (at sensitivity 1) on a Poisson sample
    at ``sample_rate``. The accountant's unit; hashable, so an epsilon is cached per history."""

    noise: Noise
    sample_rate: float
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"step count must be >= 0, got {self.count}")


@dataclass
class PrivacyAccountant:
    """Accumulates runs of identical private steps (noise, sampling rate) and reports (epsilon, delta).

    The one accountant of the project: the trainer and the DP-SGD baseline record their steps in one, the
    federation's server keeps one per data holder (rebuilt from the instructions its ledger recorded), each
    node's privacy ledger builds one from its releases, and the FedAvg baseline's nodes keep theirs in
    Flower's node state (``to_json``/``from_json``). A non-private release (``noise=None``) makes epsilon
    infinite for good.

    Epsilon comes from privacy loss distributions: dp-accounting's own for the Gaussian and the Laplace, the
    density-based one of :func:`noise_pld` for other noises (LMO); a K-dimensional Skellam release, which no PLD
    here covers, by its RDP bound (:func:`noise_epsilon`)."""

    runs: list[StepRun] = field(default_factory=list)
    non_private: bool = False

    def __post_init__(self) -> None:
        if not all(isinstance(run, StepRun) for run in self.runs):
            raise TypeError(f"runs must be StepRun records, got {self.runs!r}")

    def record(self, noise: Noise | None, sample_rate: float, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"step count must be >= 0, got {count}")
        if count == 0:
            return
        if noise is None:
            self.non_private = True
        elif self.runs and (self.runs[-1].noise, self.runs[-1].sample_rate) == (noise, sample_rate):
            self.runs[-1] = StepRun(noise, sample_rate, self.runs[-1].count + count)
        else:
            self.runs.append(StepRun(noise, sample_rate, count))

    def after(self, noise: Noise | None, sample_rate: float, count: int) -> "PrivacyAccountant":
        """A copy with ``count`` more steps: what epsilon would be, without spending anything here."""
        copy = PrivacyAccountant(list(self.runs), self.non_private)
        copy.record(noise, sample_rate, count)
        return copy

    @property
    def steps(self) -> int:
        return sum(run.count for run in self.runs)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` (:func:`noise_epsilon`: the PLD, or the RDP bound where no PLD covers a noise);
        0 before any step, infinite after a non-private release."""
        return math.inf if self.non_private else noise_epsilon(tuple(self.runs), delta)

    def to_json(self) -> str:
        return json.dumps({"runs": [[r.noise.to_json(), r.sample_rate, r.count] for r in self.runs],
                           "non_private": self.non_private})

    @classmethod
    def from_json(cls, text: str) -> "PrivacyAccountant":
        try:
            data = json.loads(text)
            accountant = cls(non_private=bool(data["non_private"]))
            for noise, rate, count in data["runs"]:
                accountant.record(Noise.from_json(noise), float(rate), int(count))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a saved PrivacyAccountant: {text[:120]!r} ({exc})") from exc
        return accountant

    def rdp_epsilon(self, delta: float) -> float:
        """RDP bound for a Gaussian history: looser, kept as a cross-check."""
        if not self.runs:
            return 0.0
        sigmas = [s for s in (run.noise.gaussian_sigma() for run in self.runs) if s is not None]
        if len(sigmas) < len(self.runs):
            raise ValueError("the RDP cross-check covers Gaussian noise only")
        event = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(gaussian_step(sigma, r.sample_rate),
                                                                                 r.count)
                                               for sigma, r in zip(sigmas, self.runs)])
        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=_RELATION)
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def pld_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    _check_delta(delta)
    accountant = pld_privacy_accountant.PLDAccountant(_RELATION, value_discretization_interval=_PLD_DISCRETIZATION)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def calibrate_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest Gaussian noise multiplier whose PLD epsilon after ``steps`` is at most ``epsilon``."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"target epsilon must be positive and finite, got {epsilon}")
    _check_delta(delta)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def make_accountant() -> pld_privacy_accountant.PLDAccountant:
        return pld_privacy_accountant.PLDAccountant(_RELATION, value_discretization_interval=_PLD_DISCRETIZATION)

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(gaussian_step(sigma, sample_rate), steps)

    # Below MIN_NOISE_MULTIPLIER the PLD's support explodes (sigma=0.01 exhausts 24 GB); such weak noise
    # is never what a private run wants, so a looser target simply gets the floor.
    if pld_epsilon(make_event(MIN_NOISE_MULTIPLIER), delta) <= epsilon:
        return MIN_NOISE_MULTIPLIER
    # Coarse search first (cheap, pessimistic so its answer is valid), then refine below it.
    coarse = dp_accounting.calibrate_dp_mechanism(
        lambda: pld_privacy_accountant.PLDAccountant(_RELATION, value_discretization_interval=1e-2),
        make_event, epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(MIN_NOISE_MULTIPLIER, 1e3), tol=1e-2,
    )
    sigma = dp_accounting.calibrate_dp_mechanism(
        make_accountant, make_event, epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(MIN_NOISE_MULTIPLIER, coarse), tol=1e-4,
    )
    # calibrate_dp_mechanism returns the upper end of its final bracket, so this holds; checked anyway.
    achieved = pld_epsilon(make_event(sigma), delta)
    if achieved > epsilon * (1 + 1e-9):
        raise RuntimeError(f"calibration failed: sigma={sigma} gives epsilon {achieved} > target {epsilon}")
    return float(sigma)


# ------------------------------------------------------------------------------ any noise, from its density
_TAIL = 1e-18  # noise mass beyond the truncated support, counted as infinite privacy loss (pessimistic)


def _support(noise: Noise) -> tuple[float, float]:
    t = noise.tail_bound(_TAIL)
    return -t, t + 1.0


def _masses(noise: Noise, sample_rate: float, mixture: bool, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(a < X <= b) under the noise (or under the subsampled mixture (1-q) N + q (N + 1)), tail-accurate."""
    def base(lo, hi):
        return np.where(hi <= 0, noise.cdf(hi) - noise.cdf(lo),
                        np.where(lo >= 0, noise.sf(lo) - noise.sf(hi), 1.0 - noise.cdf(lo) - noise.sf(hi)))
    m = base(a, b)
    return (1 - sample_rate) * m + sample_rate * base(a - 1.0, b - 1.0) if mixture else m


def _loss_function(noise: Noise, sample_rate: float, remove: bool):
    """Privacy loss at output x. REMOVE: log(mixture/noise) with x ~ mixture; ADD: log(noise/mixture), x ~ noise."""
    log_q, log_1q = math.log(sample_rate), (math.log1p(-sample_rate) if sample_rate < 1 else -math.inf)

    def loss(x: np.ndarray) -> np.ndarray:
        ell = noise.log_pdf(x - 1.0) - noise.log_pdf(x)
        mix = np.logaddexp(log_1q, log_q + ell)
        return mix if remove else -mix
    return loss


def _bucket_cells(loss, a: float, b: float, interval: float) -> tuple[np.ndarray, np.ndarray]:
    """Privacy-loss buckets (rounded up) of the cells of [a, b], where the loss is monotone: ``buckets[i]`` for
    the outputs in ``(edges[i], edges[i + 1]]``, each bucket at least the highest loss of its cell (pessimistic).
    Each cut lies within ~1e-13 of the exact level crossing, on the side whose loss is at most the level."""
    la, lb = float(loss(np.array([a]))[0]), float(loss(np.array([b]))[0])
    if abs(lb - la) < 1e-13:
        return np.array([math.ceil(max(la, lb) / interval)]), np.array([a, b])
    increasing = lb > la
    lo_k, hi_k = math.floor(min(la, lb) / interval), math.ceil(max(la, lb) / interval)
    levels = np.arange(lo_k, hi_k + 1) * interval
    levels = levels[(levels > min(la, lb)) & (levels < max(la, lb))]
    grid = np.linspace(a, b, 20_001)
    lg = loss(grid)
    # Bracket each crossing by two neighbouring grid points, grid[j] and grid[j + 1], one on each side of it.
    if increasing:  # boundary x_k = sup{L <= level}: grid[j] is the last point with L <= level
        j = np.searchsorted(lg, levels, side="right") - 1
    else:  # boundary x_k = inf{L <= level}: grid[j + 1] is the first point with L <= level (side="right"
        # counts the points at or below the level; "left" left both bracket points above it, so the cut fell
        # short of the crossing and the cell beside it held losses above its bucket: an optimistic PLD)
        j = len(grid) - 1 - np.searchsorted(lg[::-1], levels, side="right")
    j = np.clip(j, 0, len(grid) - 2)
    lo, hi = grid[j], grid[j + 1]
    for _ in range(30):  # from a 1/20,000 grid cell to ~1e-13 of the piece
        mid = 0.5 * (lo + hi)
        below = loss(mid) <= levels
        if increasing:
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        else:
            lo, hi = np.where(below, lo, mid), np.where(below, mid, hi)
    if increasing:
        cuts, cell_levels = lo, np.concatenate([levels, [lb]])  # cell i holds losses in (level_{i-1}, level_i]
    else:  # the highest level is crossed first: reverse so the cuts run left to right
        cuts, cell_levels = hi[::-1], np.concatenate([[la], levels[::-1]])
    # Bucket of each cell: the highest loss it can hold, rounded up.
    return np.ceil(cell_levels / interval - 1e-9).astype(np.int64), np.concatenate([[a], cuts, [b]])


def noise_pld(noise: Noise, sample_rate: float, interval: float = _PLD_DISCRETIZATION) -> pld_lib.PrivacyLossDistribution:
    """Pessimistic PLD of one Poisson-subsampled release with this noise and sensitivity 1, built from the
    density: each privacy-loss bucket gets exactly the mass of the outputs whose loss rounds up to it.

    Valid for noises whose log-density ratio log p(x-1)/p(x) is monotone on (-inf, 0], [0, 1] and [1, inf):
    the Gaussian and any mixture of centred Laplace distributions (log-convex on each side of 0).
    """
    if noise.std <= 0:
        raise ValueError("zero noise has no finite privacy loss")
    lo, hi = _support(noise)
    pieces = [(lo, 0.0), (0.0, 1.0), (1.0, hi)]
    pmfs, inf_masses = [], []
    for remove in (True, False):
        loss = _loss_function(noise, sample_rate, remove)
        masses = functools.partial(_masses, noise, sample_rate, remove)
        acc: dict[int, float] = {}
        for a, b in pieces:
            buckets, edges = _bucket_cells(loss, a, b, interval)
            mass = masses(edges[:-1], edges[1:])
            keys, inverse = np.unique(buckets, return_inverse=True)
            sums = np.bincount(inverse, weights=np.maximum(mass, 0.0))
            for k, m in zip(keys.tolist(), sums.tolist()):
                acc[k] = acc.get(k, 0.0) + m
        tails = masses(np.array([-np.inf]), np.array([lo])) + masses(np.array([hi]), np.array([np.inf]))
        pmfs.append(acc)
        inf_masses.append(float(tails[0]))
    return pld_lib.PrivacyLossDistribution.create_from_rounded_probability(
        pmfs[0], inf_masses[0], interval, pessimistic_estimate=True,
        rounded_probability_mass_function_add=pmfs[1], infinity_mass_add=inf_masses[1], symmetric=False)


def builtin_pld(noise: Noise, sample_rate: float, interval: float = _PLD_DISCRETIZATION,
                connect_dots: bool = True) -> pld_lib.PrivacyLossDistribution:
    """dp-accounting's own PLD for the noise (the Gaussian, a single Laplace): the reference the generic one is
    tested on."""
    pld = noise.builtin_pld(sample_rate, interval, connect_dots)
    if pld is None:
        raise ValueError(f"dp-accounting has no built-in PLD for {noise.describe()}")
    return pld


@functools.lru_cache(maxsize=256)
def step_pld(noise: Noise, sample_rate: float) -> pld_lib.PrivacyLossDistribution:
    """One step's PLD: dp-accounting's built-in where it has one (tightest), else the density-based one."""
    if noise.accounted_by_rdp:
        raise ValueError(f"{noise.describe()} has no PLD here: its steps are composed by RDP (noise_epsilon)")
    pld = noise.builtin_pld(sample_rate, _PLD_DISCRETIZATION)
    if pld is not None:
        return pld
    # Pessimistic rounding adds up to one interval of loss per step; at small q the losses are of order q,
    # so the interval shrinks with q (1e-5 at q = 1.3e-3: within 1.5% of a 4x finer one over 10,000 steps).
    return noise_pld(noise, sample_rate, min(_PLD_DISCRETIZATION, 8e-3 * sample_rate))


@functools.lru_cache(maxsize=4096)
def noise_epsilon(runs: tuple[StepRun, ...], delta: float) -> float:
    """Epsilon after runs of steps (:class:`StepRun`), any noise family.

    The PLD describes the ideal noise; the sampler cuts it at its support (shared.privacy.noise.SecureRandom), which
    adds at most ``(1 + e^eps) * sum(steps * gap)`` to delta. That term is checked to be negligible (below a
    millionth of delta) rather than silently assumed.

    A noise no PLD covers (a K-dimensional Skellam release: :meth:`Noise.rdp_curve`) is composed by RDP
    (shared.privacy.rdp). A history holding both kinds is split by basic composition: the PLD part at ``delta / 2``
    plus the RDP part at ``delta / 2``, a valid (if looser) bound for the whole."""
    _check_delta(delta)
    pld_runs, rdp_total = [], None
    for run in runs:
        if run.count <= 0:
            continue
        if not run.noise.accounted_by_rdp:
            pld_runs.append(run)
            continue
        if run.noise.support_gap() > 0:  # an RDP curve describes the ideal noise; no gap term is carried for it
            raise RuntimeError(f"{run.noise.describe()}: an RDP-accounted noise must sample its whole support")
        curve = run.count * run.noise.rdp_curve(run.sample_rate)
        rdp_total = curve if rdp_total is None else rdp_total + curve
    if rdp_total is None:
        return _pld_runs_epsilon(pld_runs, delta)
    if not pld_runs:
        return rdp_to_epsilon(rdp_total, delta)
    return _pld_runs_epsilon(pld_runs, delta / 2) + rdp_to_epsilon(rdp_total, delta / 2)


def _pld_runs_epsilon(runs: list[StepRun], delta: float) -> float:
    total, gap = None, 0.0
    for run in runs:
        pld = step_pld(run.noise, run.sample_rate).self_compose(run.count)
        total = pld if total is None else total.compose(pld)
        gap += run.count * run.noise.support_gap()
    if total is None:
        return 0.0
    epsilon = float(total.get_epsilon_for_delta(delta))
    if epsilon < 700 and gap * (1.0 + math.exp(epsilon)) > 1e-6 * delta:
        raise RuntimeError(f"the noise sampler's support gap ({gap:.3g}) is not negligible at epsilon {epsilon:.3g}")
    return epsilon
