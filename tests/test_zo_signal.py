"""The ZO signal diagnostic: its gradient is laid out like the directions, and its specs are checked."""

from __future__ import annotations

import math

import pytest
import torch

from seedtune.client.zo_step import projected_gradients
from seedtune.shared.task.config import ConfigError, RunConfig
from seedtune.shared.engine.directions import direction_torch
from seedtune.shared.engine.replica import select_trainable
from seedtune.shared.engine.update import ScoredView
from seedtune.simulations.zo_signal import Signal, mean_gradient, parse_selection, restricted
from tests.helpers import LABELS, SENTENCES


@pytest.mark.parametrize("spec", ["prune:0.2", "patterns:*norm*,*Norm*,*mlp*", "all"])
def test_restricted_gradient_is_what_the_two_point_estimate_measures(tiny_task, spec):
    """z . g_S from backprop equals the mean finite-difference projected gradient for the same seed, so the
    gradient is ordered exactly as the directions are generated over the trainable set."""
    config = parse_selection(spec, RunConfig())
    selection = select_trainable(tiny_task, config)
    ids = tiny_task.encode(SENTENCES)
    flags = [p.requires_grad for p in tiny_task.module.parameters()]
    g = restricted(mean_gradient(tiny_task, ids, LABELS, microbatch=4), selection)
    view = ScoredView(tiny_task, selection)
    for seed in (3, 11):
        z = direction_torch(seed, 0, selection.size, "rademacher", dtype=torch.float64)
        g_i, _ = projected_gradients(view, ids, LABELS, seed=seed, mu=1e-3, microbatch=4)
        assert float(z @ g) == pytest.approx(float(g_i.mean()), rel=0.02, abs=1e-3)
    assert [p.requires_grad for p in tiny_task.module.parameters()] == flags  # left as they were
    assert all(p.grad is None for p in tiny_task.module.parameters())


def test_selection_specs():
    base = RunConfig()
    config = parse_selection("prune:0.05:*mlp*", base)
    assert (config.selection.mode, config.selection.fraction, config.selection.patterns) == ("prune", 0.05, ["*mlp*"])
    assert base.selection.patterns == []  # the base config is not modified
    with pytest.raises(ValueError, match="'prune'"):
        parse_selection("prune", base)
    with pytest.raises(ConfigError, match="selection.fraction"):
        parse_selection("prune:2", base)


def test_best_learning_rate_of_a_quadratic_step():
    """For a step -lr s z with E[s z.g] = a, E[s^2] = b, E[z'Hz] = c: lr* = a / (b c), decrease a^2 / (2 b c)."""
    signal = Signal("x", 10, 1.0, signal=2.0, signal_se=0.1, scalar_m2=4.0, curvature=5.0, curvature_se=0.5)
    lr, decrease = signal.best()
    assert lr == pytest.approx(0.1) and decrease == pytest.approx(0.1)
    loss_change = lambda r: -r * 2.0 + r * r / 2 * 4.0 * 5.0  # noqa: E731
    assert loss_change(lr) == pytest.approx(-decrease)
    assert all(loss_change(lr) < loss_change(lr * f) for f in (0.5, 0.9, 1.1, 2.0))
    assert Signal("x", 10, 1.0, -1.0, 0.1, 4.0, 5.0, 0.5).best() == (None, None)
    assert not math.isnan(lr)


def test_the_bfloat16_comparison_reports_agreement_with_float32():
    """--compare-dtype: the same seeds and batches through float32 and bfloat16 forwards; on the tiny decoder
    the two-point estimates correlate at the larger mu, and the rows say how well."""
    from seedtune.shared.task.config import load_config
    from seedtune.shared.task.loading import load_task_model
    from seedtune.simulations.zo_signal import dtype_agreement

    config = load_config(None, {"model.name": "tiny-decoder", "selection.fraction": 0.2})
    ids = load_task_model(config.model).encode(SENTENCES)
    rows = dtype_agreement(config, "bfloat16", [1e-1], [(ids, LABELS), (ids, LABELS[::-1].copy())], first_seed=5)
    (row,) = rows
    assert row["dtype"] == "bfloat16" and row["estimates"] == 2 * len(SENTENCES)
    assert row["correlation"] > 0.9 and row["relative_error"] < 0.5
