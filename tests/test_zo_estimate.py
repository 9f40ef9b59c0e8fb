"""The two-point estimate is an unbiased gradient estimate: checked on a quadratic with a known gradient."""

import numpy as np
import pytest
import torch
from torch import nn

from seedtune.shared.engine.directions import direction_torch
from seedtune.shared.engine.selection import select_all
from seedtune.shared.engine.update import TrainableView


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


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder"])
def test_with_microbatch_one_an_estimate_does_not_depend_on_its_batch_mates(name):
    """Issue 32 (docs/noise.md, "Per-example independence"): records scored together in padded microbatches
    get estimates that move at float level when a record joins the batch, which the sensitivity argument does
    not allow for; scored alone (model.microbatch = 1) each record's estimate is a function of that record
    alone: bit-identical whatever else was sampled."""
    from seedtune.client.zo_step import projected_gradients
    from seedtune.shared.task.config import load_config
    from seedtune.shared.task.loading import load_task_model
    from seedtune.shared.engine.replica import select_trainable
    from seedtune.shared.task.tasks import load_split
    from seedtune.shared.engine.update import ScoredView

    config = load_config(overrides={"model.name": name, "data.train_size": 64})
    task = load_task_model(config.model, config.task)
    split = load_split(config, "train")
    ids, labels = task.encode(split.records), np.asarray(split.labels)
    view = ScoredView(task, select_trainable(task, config), config.zo.direction)
    alone, _ = projected_gradients(view, ids, labels, 7, 1e-3, 1)
    for keep in (np.arange(0, 64, 2), np.arange(32), np.arange(63, -1, -3)):
        fewer, _ = projected_gradients(view, [ids[i] for i in keep], labels[keep], 7, 1e-3, 1)
        assert np.array_equal(fewer, alone[keep])


def test_bench_independence_measures_the_move_and_finds_none_alone():
    from seedtune.simulations.bench_independence import measure

    row = measure("tiny-encoder", batches=1, alone=2)
    assert row["microbatch1_max_move_one_added"] == 0.0 and row["max_move_one_added"] > 0.0
    assert row["sensitivity_bound_over_clip"] == 1 + row["batch_size"] * row["max_move_one_added"] / row["clip"]
