"""One private zeroth-order step (DPZero): from a Poisson batch to one privatised scalar.

For a public direction z(seed), each example i gives the symmetric two-point estimate
``g_i = (L_i(theta + mu z) - L_i(theta - mu z)) / (2 mu)``. The released scalar is
``(sum_i clip(g_i, -C, C) + N(0, (sigma C)^2)) / (q n)``: add/remove-one sensitivity of the clipped sum is C,
and dividing by the *expected* batch size q n (not the realised one) keeps the sensitivity data-independent
under Poisson sampling. The caller turns the scalar into the update ``theta += (-lr * scalar) * z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from shared.models import TextClassifier
from shared.noise import Noise, SecureRandom
from shared.update import TrainableView


@dataclass(frozen=True)
class StepResult:
    seed: int
    scalar: float  # privatised (or, without privacy, plain mean) projected gradient
    batch_size: int  # realised Poisson batch size
    clipped: int  # examples whose estimate was clipped
    loss: float  # mean unperturbed-loss proxy (L+ + L-) / 2 over the batch: local monitoring only


def projected_gradients(
    task: TextClassifier,
    view: TrainableView,
    ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    seed: int,
    mu: float,
    microbatch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example two-point estimates g_i and mean losses (L+ + L-)/2, weights restored exactly after.

    Rows are grouped by length into microbatches (less padding, same values) and results returned in the
    caller's order.
    """
    n = len(ids)
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = [task.collate([ids[i] for i in order[s : s + microbatch]], labels[order[s : s + microbatch]])
               for s in range(0, n, microbatch)]
    view.snapshot()
    try:
        view.perturb(seed, mu)
        plus = torch.cat([task.per_example_loss(b) for b in batches])
        view.perturb(seed, -mu)
        minus = torch.cat([task.per_example_loss(b) for b in batches])
    finally:
        view.restore()
    unsort = torch.from_numpy(np.argsort(order))
    g = (plus.double() - minus.double()) / (2.0 * mu)
    return g[unsort], ((plus + minus) / 2)[unsort]


def privatize(
    g: torch.Tensor, clip: float, expected_batch: float, noise: Noise | None, rng: SecureRandom
) -> tuple[float, int]:
    """Clip each estimate to [-C, C], sum, add C times the (sensitivity-1) noise, divide by the expected batch."""
    clipped = g.clamp(-clip, clip)
    total = float(clipped.sum()) + (clip * float(noise.sample(rng, 1)[0]) if noise is not None else 0.0)
    return total / expected_batch, int((g.abs() > clip).sum())


def zo_step(
    task: TextClassifier,
    view: TrainableView,
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
        task, view, [train_ids[i] for i in rows], train_labels[rows], seed, mu, microbatch
    )
    if clip is None:
        scalar, clipped = (float(g.mean()) if len(g) else 0.0), 0
    else:
        scalar, clipped = privatize(g, clip, sample_rate * len(train_ids), noise, rng)
    return StepResult(seed, scalar, len(rows), clipped, float(losses.mean()) if len(losses) else float("nan"))
