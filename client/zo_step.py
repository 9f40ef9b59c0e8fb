"""One private zeroth-order step (DPZero): from a Poisson batch to one privatised scalar.

For a public direction z(seed), each example i gives the symmetric two-point estimate
``g_i = (L_i(theta + mu z) - L_i(theta - mu z)) / (2 mu)``. The released scalar is
``(sum_i clip(g_i, -C, C) + N(0, (sigma C)^2)) / (q n)``: add/remove-one sensitivity of the clipped sum is C,
and dividing by the *expected* batch size q n (not the realised one) keeps the sensitivity data-independent
under Poisson sampling. The caller turns the scalar into the update ``theta += (-lr * scalar) * z``.

The step is written against :class:`ZoModel`, so the same code (sampling, clipping, noise) runs on torch
(:class:`shared.update.ScoredView`) and on ONNX Runtime (:class:`client.onnx_runtime.OnnxView`); this module
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from shared.noise import Noise, SecureRandom


class ZoModel(Protocol):
    """What a ZO step needs of a model: seeded moves of its trainable entries and per-example losses."""

    def snapshot(self) -> None:
        """Remember the current trainable values; perturb and restore work from them."""

    def perturb(self, seed: int, scale: float) -> None:
        """Trainable values := snapshot + scale * z(seed)."""

    def restore(self) -> None:
        """Back to the snapshot, exactly."""

    def apply(self, seed: int, coeff: float) -> None:
        """theta += coeff * z(seed)."""

    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        """Cross-entropy of each example at the current trainable values (float32)."""


@dataclass(frozen=True)
class StepResult:
    seed: int
    scalar: float  # privatised (or, without privacy, plain mean) projected gradient
    batch_size: int  # realised Poisson batch size
    clipped: int  # examples whose estimate was clipped
    loss: float  # mean unperturbed-loss proxy (L+ + L-) / 2 over the batch: local monitoring only


def projected_gradients(
    model: ZoModel,
    ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    seed: int,
    mu: float,
    microbatch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example two-point estimates g_i (float64) and mean losses (L+ + L-)/2, weights restored exactly.

    Rows are grouped by length into microbatches (less padding, same values) and results returned in the
    caller's order.
    """
    n = len(ids)
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = [([ids[i] for i in order[s : s + microbatch]], labels[order[s : s + microbatch]])
               for s in range(0, n, microbatch)]
    model.snapshot()
    try:
        model.perturb(seed, mu)
        plus = np.concatenate([model.per_example_loss(*b) for b in batches])
        model.perturb(seed, -mu)
        minus = np.concatenate([model.per_example_loss(*b) for b in batches])
    finally:
        model.restore()
    unsort = np.argsort(order)
    g = (plus.astype(np.float64) - minus.astype(np.float64)) / (2.0 * mu)
    return g[unsort], ((plus + minus) / 2)[unsort]


def privatize(
    g: np.ndarray, clip: float, expected_batch: float, noise: Noise | None, rng: SecureRandom
) -> tuple[float, int]:
    """Clip each estimate to [-C, C], sum, add C times the (sensitivity-1) noise, divide by the expected batch."""
    g = np.asarray(g, dtype=np.float64)
    clipped = np.clip(g, -clip, clip)
    total = float(clipped.sum()) + (clip * float(noise.sample(rng, 1)[0]) if noise is not None else 0.0)
    return total / expected_batch, int((np.abs(g) > clip).sum())


def zo_step(
    model: ZoModel,
    train_ids: Sequence[Sequence[int]],
    train_labels: np.ndarray,
    *,
    seed: int,
    mu: float,
    sample_rate: float,
    microbatch: int,
    rng: SecureRandom,
    clip: float | None,
    noise: Noise | None,
) -> StepResult:
    """A full step's estimate on a Poisson sample; ``clip=None`` is the non-private MeZO estimate."""
    rows = rng.poisson_sample(len(train_ids), sample_rate)
    g, losses = projected_gradients(
        model, [train_ids[i] for i in rows], train_labels[rows], seed, mu, microbatch
    )
    if clip is None:
        scalar, clipped = (float(g.mean()) if len(g) else 0.0), 0
    else:
        scalar, clipped = privatize(g, clip, sample_rate * len(train_ids), noise, rng)
    return StepResult(seed, scalar, len(rows), clipped, float(losses.mean()) if len(losses) else float("nan"))
