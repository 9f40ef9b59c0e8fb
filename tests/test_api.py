"""seedtune's Python API: PrivateZO on a user's own model (and the runnable example), replay onto it, model
cards, and a replayed classifier loaded back with its head."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import seedtune
from seedtune.shared.task.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _mlp_task(n: int = 400):
    torch.manual_seed(0)
    x = torch.randn(n, 4)
    y = x.sum(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(m, index):
        idx = torch.from_numpy(index)
        return (m(x[idx]).squeeze(-1) - y[idx]) ** 2
    return model, loss_fn


def test_the_example_trains_its_own_model_privately_and_replays_it(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model.py"), "--out", str(tmp_path / "run"),
                          "--steps", "200", "--no-progress"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 2.9 < result["epsilon"] <= 3.0 and result["steps"] == 200 and result["verified_entries"] == 200
    assert result["replay_matches"] is True
    assert result["test_mse_after"] < 0.7 * result["test_mse_before"]


def test_private_zo_spends_its_budget_step_by_step_and_writes_a_replayable_ledger(tmp_path):
    model, loss_fn = _mlp_task()
    base = copy.deepcopy(model)
    trainer = seedtune.PrivateZO(model, loss_fn, 400, steps=10, epsilon=1.0, batch_size=40, lr=0.05,
                                 trainable=["2.*"], ledger=tmp_path / "l.sqlite")
    assert trainer.epsilon == 0.0
    trainer.step()
    first = trainer.epsilon
    summary = trainer.fit(progress=False)
    assert 0 < first < summary["epsilon"] <= 1.0 and summary["steps"] == 10
    with pytest.raises(RuntimeError, match="all 10 planned steps are done"):
        trainer.step()
    trainer.close()
    assert torch.equal(model[0].weight, base[0].weight) and not torch.equal(model[2].weight, base[2].weight)
    replayed = seedtune.replay(tmp_path / "l.sqlite", model=base)
    assert replayed["entries"] == 10 and replayed["ledger_head"] == summary["ledger_head"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    with pytest.raises(ConfigError, match="not the base model"):  # base is the trained model now
        seedtune.replay(tmp_path / "l.sqlite", model=base)


def test_a_full_frame_step_is_the_gradient_step_and_costs_what_one_direction_costs(tmp_path):
    """directions=0 with Hadamard directions: K one-sided estimates along a full frame over the trainable entries
    are the gradient in another basis, so a non-private step on a loss linear in the weights (where the finite
    difference is exact) moves the weights by -lr times the mean gradient; privately, the K-vector is one
    Gaussian release, so K directions spend what one spends, and the ledger replays the weights."""
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    model = nn.Linear(5, 3)
    base = copy.deepcopy(model)

    def loss_fn(m, index):  # linear in the weights: w_c . x + b_c of each example's class c = index % 3
        idx = torch.from_numpy(index)
        return m(x[idx]).gather(1, (idx % 3)[:, None]).squeeze(1)

    plain = seedtune.PrivateZO(model, loss_fn, 64, steps=1, batch_size=64, lr=0.5, mu=1e-2, direction="hadamard",
                               directions=0, private=False)
    assert plain.directions == 32  # 18 entries: the frame of 32
    plain.step()
    model_rows = torch.nn.functional.one_hot(torch.arange(64) % 3, 3).float()
    grad_w, grad_b = model_rows.T @ x / 64, model_rows.mean(0)
    torch.testing.assert_close(model.weight, base.weight - 0.5 * grad_w, atol=2e-5, rtol=0)
    torch.testing.assert_close(model.bias, base.bias - 0.5 * grad_b, atol=2e-5, rtol=0)
    many = seedtune.PrivateZO(copy.deepcopy(base), loss_fn, 64, steps=5, batch_size=16, epsilon=2.0,
                              direction="hadamard", directions=0, ledger=tmp_path / "k.sqlite")
    one = seedtune.PrivateZO(copy.deepcopy(base), loss_fn, 64, steps=5, batch_size=16, epsilon=2.0)
    summary = many.fit(progress=False)
    one.fit(progress=False)
    assert summary["epsilon"] == pytest.approx(one.epsilon) and summary["epsilon"] <= 2.0
    many.close()
    replayed = seedtune.replay(tmp_path / "k.sqlite", model=copy.deepcopy(base))
    assert replayed["entries"] == 5 * 32 and replayed["ledger_head"] == summary["ledger_head"]


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 500}, "batch_size 500 exceeds num_examples 400"),
    ({"epsilon": 0.0}, "epsilon must be a positive number, got 0.0"),
    ({"epsilon": "3"}, "epsilon must be a positive number, got '3'"),
    ({"trainable": "2.*"}, "trainable must be a non-empty list of glob patterns"),
    ({"trainable": []}, "trainable must be a non-empty list of glob patterns"),
    ({"trainable": ["nothing.*"]}, "no parameter name matches"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"direction": "uniform"}, "direction must be one of"),
    ({"directions": 0}, "or 0 (a full frame) with direction='hadamard', got 0"),
    ({"directions": -2}, "directions must be an integer >= 1"),
    ({"directions": 4, "noise": "laplace"}, "directions other than 1 need noise='gaussian'"),
])
def test_private_zo_refuses_bad_settings_by_name(kwargs, message):
    model, loss_fn = _mlp_task()
    with pytest.raises(ConfigError, match=re.escape(message)):
        seedtune.PrivateZO(model, loss_fn, 400, steps=5, **kwargs)


def test_a_loss_that_is_not_per_example_is_refused(tmp_path):
    model, loss_fn = _mlp_task()
    with pytest.raises(ValueError, match="one loss per example"):
        seedtune.PrivateZO(model, lambda m, i: loss_fn(m, i).mean(), 400, steps=5, batch_size=40)


@pytest.mark.parametrize("batch_level", [
    lambda losses: losses.mean().expand(len(losses)),  # a batch mean broadcast to shape (B,)
    lambda losses: losses / losses.sum(),  # normalised over the batch
    lambda losses: losses + 0.01 * losses.roll(1),  # a neighbour's loss mixed in
], ids=["mean", "normalised", "neighbour"])
def test_a_loss_that_depends_on_the_rest_of_its_batch_is_refused_before_anything_is_written(tmp_path, batch_level):
    """Issue 32, finding 6: a batch mean broadcast to (B,) passed the shape check, so one added record moved the
    clipped sum by 30 at C = 1 while the accounting assumed 1."""
    model, loss_fn = _mlp_task()
    with pytest.raises(ConfigError, match="loss_fn is not per-example"):
        seedtune.PrivateZO(model, lambda m, i: batch_level(loss_fn(m, i)), 400, steps=5, batch_size=40,
                           ledger=tmp_path / "l.sqlite")
    assert not (tmp_path / "l.sqlite").exists()


def test_an_existing_ledger_is_never_overwritten(tmp_path):
    model, loss_fn = _mlp_task()
    (tmp_path / "l.sqlite").write_bytes(b"x")
    with pytest.raises(ConfigError, match="exists"):
        seedtune.PrivateZO(model, loss_fn, 400, steps=5, ledger=tmp_path / "l.sqlite")
    assert (tmp_path / "l.sqlite").read_bytes() == b"x"


def test_the_cli_names_how_to_replay_an_own_model_ledger(tmp_path):
    model, loss_fn = _mlp_task()
    with seedtune.PrivateZO(model, loss_fn, 400, steps=2, batch_size=40, ledger=tmp_path / "l.sqlite") as t:
        t.fit(progress=False)
    out = subprocess.run([sys.executable, "-m", "seedtune.cli", "replay", str(tmp_path / "l.sqlite")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "seedtune.replay(" in out.stderr and "Traceback" not in out.stderr
    assert seedtune.verify(tmp_path / "l.sqlite", unanchored=True)["entries"] == 2


def test_a_replayed_encoder_has_a_model_card_and_loads_with_its_head(tmp_path):
    summary = seedtune.train(overrides={"model.name": "tiny-encoder", "schedule.stage_steps": [6, 4],
                                        "eval.every": 0, "data.train_size": 1500, "data.test_size": 32},
                             out=tmp_path / "run", progress=False)
    result = seedtune.replay(tmp_path / "run" / "ledger.sqlite", tmp_path / "model")
    assert result["epsilon"] == pytest.approx(summary["epsilon"], rel=1e-9)  # accounted afresh, the same
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"epsilon: {summary['epsilon']:.4g}" in card and "delta: 1e-05" in card
    assert "Task: sst2 (classification)" in card and "Labels: 0, 1" in card
    assert "Data size: not stated" in card and str(summary["train_size"]) not in card  # private data's size
    assert result["ledger_head"] in card and summary["model_digest"] in card
    assert f"seedtune replay {tmp_path / 'run' / 'ledger.sqlite'} --out {tmp_path / 'model'}" in card

    from seedtune.server.replay import replay_ledger

    replica, _, _ = replay_ledger(tmp_path / "run" / "ledger.sqlite")
    loaded = seedtune.load_model(tmp_path / "model")
    ids = replica.task.encode(replica.task.probe(["a moving, funny film", "dull", "it was fine, I guess"] * 3))
    assert torch.equal(loaded.module.head.weight, replica.task.module.head.weight)
    np.testing.assert_array_equal(loaded.predictions(ids, 4), replica.predictions(ids))


def test_a_failed_loss_leaves_nothing_half_done_and_the_step_can_be_retried(tmp_path):
    model, loss_fn = _mlp_task()
    state = {"fail": False}

    def flaky(m, index):
        if state["fail"]:
            state["fail"] = False
            raise OSError("data file went away")
        return loss_fn(m, index)

    before = [p.clone() for p in model.parameters()]
    trainer = seedtune.PrivateZO(model, flaky, 400, steps=3, batch_size=40, ledger=tmp_path / "l.sqlite")
    state["fail"] = True  # the next loss call: the first step's
    with pytest.raises(OSError):
        trainer.step()
    assert trainer.steps_done == 0 and trainer.epsilon == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored, nothing applied
    trainer.fit(progress=False)
    assert trainer.steps_done == 3 and trainer.summary()["ledger_head"]
    trainer.close()
    assert seedtune.verify(tmp_path / "l.sqlite", unanchored=True)["entries"] == 3


def test_batchnorm_statistics_never_learn_from_the_private_batches(tmp_path):
    """The loss passes run in eval mode: a BatchNorm's running statistics (updated without noise in train
    mode) stay as they were, and its 0-dim num_batches_tracked buffer digests."""
    torch.manual_seed(0)
    x, y = torch.randn(400, 4) * 3 + 1, torch.randn(400)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    base = copy.deepcopy(model)
    stats = model[1].running_mean.clone()

    def loss_fn(m, index):
        idx = torch.from_numpy(index)
        return (m(x[idx]).squeeze(-1) - y[idx]) ** 2

    with seedtune.PrivateZO(model, loss_fn, 400, steps=4, batch_size=40, ledger=tmp_path / "l.sqlite") as t:
        t.fit(progress=False)
    assert model.training and torch.equal(model[1].running_mean, stats)
    seedtune.replay(tmp_path / "l.sqlite", model=base)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
