"""The two-point estimate is an unbiased gradient estimate: checked on a quadratic with a known gradient."""

import numpy as np
import pytest
import torch
from torch import nn

from seedtune.shared.directions import direction_torch
from seedtune.shared.selection import select_all
from seedtune.shared.update import TrainableView


class Quadratic(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        basis = torch.randn(dim, dim, generator=g)
        self.register_buffer("hessian", basis @ basis.T / dim + torch.eye(dim))
        self.register_buffer("optimum", torch.randn(dim, generator=g))
        self.theta = nn.Parameter(torch.randn(dim, generator=g))

    def loss(self) -> torch.Tensor:
        d = (self.theta.detach() - self.optimum).double()
        return 0.5 * d @ self.hessian.double() @ d

    def gradient(self) -> torch.Tensor:
        return self.hessian.double() @ (self.theta.detach() - self.optimum).double()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_mean_estimate_over_many_directions_matches_the_gradient(kind):
    dim, n = 16, 20_000
    model = Quadratic(dim)
    view = TrainableView(model, select_all(model), kind)
    mu = 1e-3
    total = torch.zeros(dim, dtype=torch.float64)
    view.snapshot()
    for seed in range(n):
        view.perturb(seed, mu)
        plus = model.loss()
        view.perturb(seed, -mu)
        minus = model.loss()
        g = float(plus - minus) / (2 * mu)
        total += g * direction_torch(seed, 0, dim, kind, dtype=torch.float64)
    view.restore()
    estimate, truth = total / n, model.gradient()
    # Rademacher: var of each coordinate is ||grad||^2 - grad_i^2 per sample; 20k samples -> ~1-3% error.
    relative_error = float((estimate - truth).norm() / truth.norm())
    assert relative_error < 0.1, relative_error
    cosine = float(estimate @ truth / (estimate.norm() * truth.norm()))
    assert cosine > 0.99


def test_zo_descent_reduces_the_quadratic():
    model = Quadratic(8)
    view = TrainableView(model, select_all(model))
    start = float(model.loss())
    for seed in range(2000):
        view.snapshot()
        view.perturb(seed, 1e-3)
        plus = float(model.loss())
        view.perturb(seed, -1e-3)
        minus = float(model.loss())
        view.restore()
        view.apply(seed, float(np.float32(-0.01 * (plus - minus) / 2e-3)))
    assert float(model.loss()) < 0.01 * start
