"""Holder-level DP (privacy.unit = "holder"): a node's whole round is one release, clipped as a whole, let in by a
secret coin; each holder is charged one event per round at the coin's rate, by the node and by the server alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seedtune.client.privacy_ledger import open_privacy_ledger
from seedtune.client.trainer import plan_privacy
from seedtune.client.zo_step import holder_integer_release, holder_release
from seedtune.server.federation import FederatedServer
from seedtune.shared.privacy.accounting import StepRun, noise_epsilon
from seedtune.shared.privacy.noise import Noise, SecureRandom, Skellam
from seedtune.shared.task.config import ConfigError
from seedtune.simulations.inprocess import InProcessGrid
from tests.test_federation import fed_config

ROOT = Path(__file__).resolve().parents[1]
HOLDER_RUN = {"privacy.noise_multiplier": 0.0, "privacy.unit": "holder", "privacy.holder_rate": 0.5}


def test_a_round_is_clipped_as_a_whole_and_let_in_by_the_coin():
    rng, silent = SecureRandom(), Noise.gaussian(0.0)
    small, large = np.array([0.3, -0.4]), np.array([3.0, 4.0, 0.0])
    assert np.allclose(holder_release(small, 1.0, 1.0, silent, rng), small)  # within the clip: as it is
    assert np.allclose(holder_release(large, 1.0, 1.0, silent, rng), large / 5.0)  # the whole vector, to norm C
    assert np.array_equal(holder_release(np.array([np.inf, 1.0]), 1.0, 1.0, silent, rng), [0.0, 0.0])
    draws = np.array([holder_release(large, 1.0, 0.25, silent, rng) for _ in range(4000)])
    kept = np.any(draws != 0, axis=1)
    assert np.allclose(draws[kept], large / 5.0 / 0.25) and not draws[~kept].any()  # in (and rescaled), or out
    assert abs(kept.mean() - 0.25) < 0.03
    noisy = np.array([holder_release(np.zeros(3), 2.0, 0.5, Noise.gaussian(1.5), rng) for _ in range(4000)])
    assert noisy.std() == pytest.approx(2.0 * 1.5 / 0.5, rel=0.05)  # C sigma per scalar, over the rate


@pytest.fixture(scope="module")
def holder_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("holder")
    grid = InProcessGrid(3, privacy_ledger=str(run_dir / "holders.sqlite"))
    server = FederatedServer(fed_config(run_dir, **HOLDER_RUN), grid, run_dir)
    return run_dir, server, server.run()


def test_each_holder_is_charged_one_release_per_round_at_the_coins_rate(holder_run):
    run_dir, server, summary = holder_run
    noise = server.noise
    assert noise is not None
    expected = noise_epsilon((StepRun(noise, 0.5, 3),), 1e-5)  # 3 rounds, whatever the local steps
    assert expected == pytest.approx(3.0, abs=0.01)
    ledger = open_privacy_ledger(run_dir / "holders.sqlite")
    rows = {row["budget"]: row for row in ledger.summary(1e-5)}
    for holder, spent in summary["epsilon_holders"].items():
        assert spent == pytest.approx(expected) and rows[holder]["steps"] == 3
    assert summary["epsilon_agree"] and summary["clients_agree"]
    assert all(r["accepted"] == 3 for r in server.report.rows if r.get("round", 0) >= 1)


def test_the_model_card_states_the_holder_level_guarantee(holder_run, tmp_path):
    run_dir, _, summary = holder_run
    out = subprocess.run([sys.executable, "-m", "seedtune.cli", "replay", str(run_dir / "ledger.sqlite"),
                          "--out", str(tmp_path / "model")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["epsilon"] == pytest.approx(summary["epsilon_max"])
    card = (tmp_path / "model" / "README.md").read_text()
    assert "for one data holder's whole data added to or removed from the federation" in card
    assert "- Privacy unit: a data holder's whole data (add/remove)" in card and "one training example" not in card


@pytest.mark.parametrize("extra, key", [
    ({"privacy.noise": "laplace"}, "privacy.unit"),
    ({"privacy.enabled": False}, "privacy.unit"),
    ({"privacy.holder_rate": 0.0}, "privacy.holder_rate"),
    ({"privacy.holder_rate": 1.5}, "privacy.holder_rate")])
def test_what_holder_level_dp_cannot_account_is_refused_by_name(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        fed_config(tmp_path, **{**HOLDER_RUN, **extra})


def test_a_centralized_run_refuses_the_holder_unit(tmp_path):
    with pytest.raises(ConfigError, match="privacy.unit"):
        plan_privacy(fed_config(tmp_path, **HOLDER_RUN), 1000)


def test_a_holder_round_under_secure_aggregation_is_one_skellam_release_of_the_rounds_length(tmp_path, monkeypatch):
    """privacy.unit = "holder" with secure aggregation: each node's round vector (every local step's mean
    estimate) is clipped as a whole, let in by its coin, rounded and noised with its share of the Skellam noise
    accounted for that vector's length; the server learns the sum, divides it by the coin's rate, and each holder
    is charged one release per round at that rate, central and local."""
    from tests.test_secure_aggregation import NODES, SECURE_RUN, STEPS, Recorder

    grid = InProcessGrid(NODES, privacy_ledger=str(tmp_path / "holders.sqlite"))
    recorder = Recorder(grid, monkeypatch)
    config = fed_config(tmp_path / "run", **{**SECURE_RUN, **HOLDER_RUN})
    server = FederatedServer(config, grid, tmp_path / "run")
    summary = server.run()
    noise = server.noise
    assert isinstance(noise, Skellam) and noise.directions == STEPS  # the round's vector, one direction a step
    assert summary["clients_agree"] and summary["epsilon_agree"] and len(server.ledger) == 2 * STEPS
    expected = noise_epsilon((StepRun(noise, 0.5, 2),), 1e-5)  # 2 rounds at the coin's rate
    assert expected <= 3.0
    rows = {row["budget"]: row for row in open_privacy_ledger(tmp_path / "holders.sqlite").summary(1e-5)}
    for holder, spent in summary["epsilon_holders"].items():
        assert spent == pytest.approx(expected) and rows[holder]["steps"] == 2
        assert rows[f"{holder}#local"]["epsilon"] > 1.3 * expected
    for rnd in (1, 2):  # the aggregate is the nodes' vectors' sum over the coin's rate
        total = sum(recorder.vectors[rnd, node] for node in server.courier.live())
        aggregate = next(p for p in server.ledger.replies(rnd) if p.status == "secure_sum").values()
        np.testing.assert_allclose(aggregate, (total * config.privacy.clip / (noise.sensitivity * 0.5 * NODES))
                                   .astype("<f4"), rtol=1e-6)


def test_a_holder_vector_is_clipped_whole_let_in_by_the_coin_and_rounded_within_the_sensitivity():
    rng = SecureRandom()
    quiet = Skellam(1e-12, 400, 16)
    large = np.full(16, 3.0)  # norm 12: clipped to C = 1 as a whole
    draws = np.array([holder_integer_release(large, 1.0, 0.25, quiet, 1, rng) for _ in range(2000)])
    kept = np.any(draws != 0, axis=1)
    assert abs(kept.mean() - 0.25) < 0.04
    assert np.all(np.abs(draws[kept] - 100) <= 1)  # 400 units / sqrt(16) per coordinate, rounded
    assert np.linalg.norm(draws, axis=1).max() <= quiet.l2_sensitivity
