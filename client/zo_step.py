"""One private zeroth-order step (DPZero): from a Poisson batch to one privatised scalar.

For a public direction z(seed), each example i gives the symmetric two-point estimate
``g_i = (L_i(theta + mu z) - L_i(theta - mu z)) / (2 mu)``. The released scalar is
``(sum_i clip(g_i, -C, C) + N(0, (sigma C)^2)) / (q n)``: add/remove-one sensitivity of the clipped sum is C,
and dividing by the *expected* batch size q n (not the realised one) keeps the sensitivity data-independent
under Poisson sampling. The caller turns the scalar into the update ``theta += (-lr * scalar) * z``.

With K > 1 directions per step (``zo.directions``) the K estimates share one unperturbed pass: example i gives
the vector ``g_i[k] = (L_i(theta + mu z_k) - L_i(theta)) / (mu sqrt(K))``, K + 1 forward passes instead of 2K,
clipped to L2 norm C as a whole. The 1 / sqrt(K) makes C a bound on the gradient itself, whatever K:
``||Z^T g||^2 / K`` is ``||g||^2`` on average over random directions and exactly for a Hadamard frame of
K = n directions (shared.engine.directions), so privacy.clip means what DP-SGD's clip means. The released K-vector is
one Gaussian mechanism of L2 sensitivity C, accounted exactly like the single scalar, and the caller's update
is ``theta -= (lr / sqrt(K)) sum_k scalar_k z_k`` (:func:`shared.protocol.aggregation.update_scale`): lr times
the gradient, on average (exactly, for the frame).

The step is written against :class:`shared.engine.follower.ZoModel`, so the same code (sampling, clipping, noise)
runs on torch (:class:`shared.engine.update.ScoredView`) and on ONNX Runtime (:class:`client.onnx_runtime.OnnxView`); this module
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from seedtune.shared.engine.batching import length_sorted
from seedtune.shared.engine.follower import ZoModel
from seedtune.shared.privacy.noise import Noise, SecureRandom, Skellam
from seedtune.shared.privacy.skellam import quantize


@dataclass(frozen=True)
class StepResult:
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]  # privatised (or, without privacy, plain mean) projected gradients, one per seed
    batch_size: int  # realised Poisson batch size
    clipped: int  # examples whose estimate was clipped
    nonfinite: int  # examples whose estimate was not finite, zeroed before clipping
    loss: float  # mean unperturbed-loss proxy over the batch: local monitoring only, never released


def _losses_at(
    model: ZoModel,
    ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    moves: Sequence[tuple[int, float] | None],
    microbatch: int,
) -> np.ndarray:
    """Per-example losses (float32, shape (n, len(moves))) at snapshot + scale * z(seed) for each (seed, scale)
    move, ``None`` (first only) being the snapshot itself; weights restored exactly, rows in the caller's order.

    Rows are scored in length-sorted microbatches: less padding, same values.
    """
    if len(ids) == 0:
        return np.zeros((0, len(moves)), dtype=np.float32)
    batches = [(rows, [ids[i] for i in rows], labels[rows]) for rows in length_sorted(ids, microbatch)]
    losses = np.empty((len(ids), len(moves)), dtype=np.float32)
    model.snapshot()
    try:
        for column, move in enumerate(moves):
            if move is not None:
                model.perturb(*move)
            for rows, batch_ids, batch_labels in batches:
                losses[rows, column] = model.per_example_loss(batch_ids, batch_labels)
    finally:
        model.restore()
    return losses


def projected_gradients(
    model: ZoModel,
    ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    seed: int,
    mu: float,
    microbatch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example two-point estimates g_i (float64) and mean losses (L+ + L-)/2, in the caller's order."""
    losses = _losses_at(model, ids, labels, [(seed, mu), (seed, -mu)], microbatch)
    plus, minus = losses[:, 0], losses[:, 1]
    return (plus.astype(np.float64) - minus.astype(np.float64)) / (2.0 * mu), (plus + minus) / 2


def one_sided_gradients(
    model: ZoModel,
    ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    seeds: Sequence[int],
    mu: float,
    microbatch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example one-sided estimates along each seed's direction, shape (n, K) float64, and the unperturbed
    losses; K + 1 passes over the batch, in the caller's order."""
    losses = _losses_at(model, ids, labels, [None, *((seed, mu) for seed in seeds)], microbatch)
    g = (losses[:, 1:].astype(np.float64) - losses[:, :1].astype(np.float64)) / mu
    return g, losses[:, 0]


def zero_nonfinite(g: np.ndarray) -> tuple[np.ndarray, int]:
    """``g`` (n, K) with every row holding a NaN or an infinity set to zero, and how many rows that was.

    A loss that overflows gives an infinite estimate, and clipping cannot bound it (inf * 0 is NaN): the
    released sum would be NaN or infinite, which no noise hides. A zero row is what removing that example's
    contribution gives, so the clipped sum keeps its sensitivity C."""
    g = np.asarray(g, dtype=np.float64)
    bad = ~np.isfinite(g).all(axis=1) if g.ndim == 2 else ~np.isfinite(g)
    if not bad.any():
        return g, 0
    g = g.copy()
    g[bad] = 0.0
    return g, int(bad.sum())


def clip_rows(g: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """Each example's row of ``g`` (n, K), non-finite rows zeroed, scaled to L2 norm at most C; and how many
    rows were clipped."""
    g, _ = zero_nonfinite(g)
    norms = np.linalg.norm(g, axis=1)
    scale = np.minimum(1.0, clip / np.maximum(norms, np.finfo(np.float64).tiny))
    return g * scale[:, None], int((norms > clip).sum())


def privatize_vectors(
    g: np.ndarray, clip: float, expected_batch: float, noise: Noise | None, rng: SecureRandom
) -> tuple[np.ndarray, int]:
    """Clip each example's row of ``g`` (n, K) to L2 norm C, sum, add C times K draws of the (sensitivity-1)
    noise, divide by the expected batch; also returns how many rows were clipped."""
    clipped, count = clip_rows(g, clip)
    total = clipped.sum(axis=0)
    if noise is not None:
        total = total + clip * np.asarray(rng.noise(noise, g.shape[1]), dtype=np.float64)
    return total / expected_batch, count


def holder_release(values: np.ndarray, clip: float, rate: float, noise: Noise, rng: SecureRandom) -> np.ndarray:
    """A node's whole round as one release, when the privacy unit is its data holder (privacy.unit = "holder"):
    its vector of scalars (every step's mean estimate) clipped to L2 norm C as a whole, let in with probability
    ``rate`` by a secret CSPRNG coin (else zeros: the node sends the noise alone, and nobody can tell which), plus
    C times the (sensitivity-1) noise per scalar, divided by ``rate`` so the mean over nodes stays unbiased. Adding
    or removing the holder moves the vector by at most C: one Poisson-subsampled Gaussian release per round."""
    clipped = clip_rows(np.asarray(values, dtype=np.float64)[None, :], clip)[0][0]  # non-finite: zeros
    kept = clipped if rng.uniform(1)[0] < rate else np.zeros_like(clipped)
    return (kept + clip * np.asarray(rng.noise(noise, values.size), dtype=np.float64)) / rate


def privatize(
    g: np.ndarray, clip: float, expected_batch: float, noise: Noise | None, rng: SecureRandom
) -> tuple[float, int]:
    """The single-direction case: clip each estimate to [-C, C], sum, add noise, divide by the expected batch."""
    total, clipped = privatize_vectors(np.asarray(g, dtype=np.float64)[:, None], clip, expected_batch, noise, rng)
    return float(total[0]), clipped


def estimates(model: ZoModel, train_ids: Sequence[Sequence[int]], train_labels: np.ndarray, seeds: Sequence[int],
              mu: float, sample_rate: float, microbatch: int, rng: SecureRandom) -> tuple[np.ndarray, np.ndarray, int]:
    """A Poisson sample's per-example estimates along each seed, shape (n, K) (one seed: the symmetric
    two-point estimate; several: one-sided estimates sharing the unperturbed pass, divided by sqrt(K)), non-finite
    rows zeroed; the sample's unperturbed losses; how many rows were zeroed."""
    if not seeds:
        raise ValueError("a ZO step needs at least one direction seed")
    rows = rng.poisson_sample(len(train_ids), sample_rate)
    ids, labels = [train_ids[i] for i in rows], train_labels[rows]
    if len(seeds) == 1:
        g, losses = projected_gradients(model, ids, labels, seeds[0], mu, microbatch)
        g = g[:, None]
    else:
        # A model that can evaluate all K directions at once (a head-only view over a Hadamard frame) does;
        # others make K + 1 passes.
        frame = getattr(model, "frame_estimates", None)
        found = frame(ids, labels, seeds, mu) if frame is not None else None
        g, losses = found if found is not None else one_sided_gradients(model, ids, labels, seeds, mu, microbatch)
        g = g / np.sqrt(len(seeds))
    g, nonfinite = zero_nonfinite(g)
    return g, losses, nonfinite


def zo_step(
    model: ZoModel,
    train_ids: Sequence[Sequence[int]],
    train_labels: np.ndarray,
    *,
    seeds: Sequence[int],
    mu: float,
    sample_rate: float,
    microbatch: int,
    rng: SecureRandom,
    clip: float | None,
    noise: Noise | None,
) -> StepResult:
    """A full step's estimates on a Poisson sample, one per seed (one seed: the symmetric two-point estimate;
    several: one-sided estimates sharing the unperturbed pass); ``clip=None`` is the non-private MeZO estimate."""
    g, losses, nonfinite = estimates(model, train_ids, train_labels, seeds, mu, sample_rate, microbatch, rng)
    if clip is None:
        scalars, clipped = (g.mean(axis=0) if len(g) else np.zeros(len(seeds))), 0
    else:
        scalars, clipped = privatize_vectors(g, clip, sample_rate * len(train_ids), noise, rng)
    return StepResult(tuple(seeds), tuple(float(s) for s in scalars), len(g), clipped, nonfinite,
                      float(losses.mean()) if len(losses) else float("nan"))


def holder_integer_release(values: np.ndarray, clip: float, rate: float, noise: Skellam, share: int,
                           rng: SecureRandom) -> np.ndarray:
    """:func:`holder_release` under secure aggregation: the round's vector clipped to L2 norm C as a whole, let in
    with probability ``rate`` by a secret CSPRNG coin (else zeros, and nobody can tell which), rounded to integer
    units as :func:`integer_release` rounds one example's row, plus this node's ``1 / share`` of the central
    Skellam variance. Adding or removing the holder moves the sum by at most the record's sensitivities: one
    Poisson-subsampled Skellam release per round. The server divides the sum by ``rate`` (not by a batch)."""
    row = np.asarray(values, dtype=np.float64)[None, :]
    kept = row if rng.uniform(1)[0] < rate else np.zeros_like(row)
    return integer_release(kept, clip, noise, share, rng)


def integer_release(g: np.ndarray, clip: float, noise: Skellam, share: int, rng: SecureRandom) -> np.ndarray:
    """A secure-aggregation step's vector from its estimates ``g`` (n, K) (shared.privacy.skellam): each
    example's clipped row in units of ``clip / noise.sensitivity``, rounded up or down at random (so one example
    moves the sum by at most the noise record's L2 and L1 sensitivities, whatever the coin flips), summed, plus this
    node's ``1 / share`` of the central Skellam variance. int64, one per seed; the caller masks it before it leaves
    the node."""
    if g.shape[1] != noise.directions:
        raise ValueError(f"{g.shape[1]} directions per step, but the Skellam noise is accounted for "
                         f"{noise.directions}")
    clipped, _ = clip_rows(g, clip)
    # K coordinates: a hair under the units, so a row clipped in floating point (a few ulps over C) stays within
    # the L2 bound the accountant takes (one coordinate is held to [-S, S] by the limit)
    scale = noise.sensitivity / clip * (1.0 if noise.directions == 1 else 1.0 - 1e-9)
    total = quantize(clipped, scale, rng, limit=noise.sensitivity).sum(axis=0, dtype=np.int64)
    return total + Skellam.integers(rng, g.shape[1], noise.variance / share)
