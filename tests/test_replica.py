"""Replicas: catching up from any position in the ledger, and refusing foreign or altered histories."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from seedtune.shared.protocol.aggregation import ACCEPTED, RoundRule
from seedtune.shared.protocol.ledger import Ledger, Provenance
from seedtune.shared.protocol.chain import ChainError
from seedtune.shared.task.config import config_from_flower, load_config
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.engine.follower import ReplicaError
from seedtune.shared.engine.replica import Replica



@pytest.fixture(scope="module")
def replica() -> Replica:
    return Replica(load_config(None, {"model.name": "tiny-decoder", "selection.fraction": 0.05}))


@pytest.fixture
def ledger(tmp_path, replica) -> Ledger:
    led = Ledger.create(tmp_path / "l.sqlite", replica.make_header(Noise.gaussian(1.0)))
    rng = np.random.default_rng(0)
    for rnd in range(1, 5):
        scalars = (rng.normal(size=(2, 3)) * 0.1).astype("<f4")
        rule = RoundRule("mean", 1e-2)
        led.commit_round(rnd, [int(rng.integers(0, 2**63)) for _ in range(3)], rule.coefficients(scalars),
                         [Provenance(1 + n, f"h{n}", ACCEPTED, scalars[n].tobytes()) for n in range(2)], rule)
    return led


def test_catch_up_from_any_version_agrees(replica, ledger):
    replica.attach(ledger.header)
    replica.catch_up(ledger.tail(0))
    full = replica.digest()
    for version in (0, 4, 7, 12):
        replica.attach(ledger.header)
        replica.apply(list(ledger.entries(0, version)), ledger.hash_at(version))
        # A tail that starts before our version is fine when it agrees with our history.
        applied = replica.catch_up(ledger.tail(max(0, version - 2)))
        assert applied == 12 - version and replica.digest() == full


def test_an_altered_history_or_a_gap_is_refused(replica, ledger):
    replica.attach(ledger.header)
    replica.catch_up(ledger.tail(0))
    tail = ledger.tail(4)
    replica.attach(ledger.header)
    with pytest.raises(ReplicaError, match="starts at 4 but this replica is at version 0"):
        replica.catch_up(tail)
    replica.apply(list(ledger.entries(0, 6)), ledger.hash_at(6))
    replica.head = b"\x00" * 32  # as if our history differed from the ledger's
    with pytest.raises(ChainError, match="differs from this replica's"):
        replica.catch_up(tail)


def test_a_ledger_for_another_model_is_refused(replica, ledger):
    other = Replica(load_config(None, {"model.name": "tiny-decoder", "selection.fraction": 0.1}))
    with pytest.raises(ReplicaError, match="trainable set digest"):
        other.attach(ledger.header)
    header = ledger.header
    header.base_model_digest = "0" * 64
    with pytest.raises(ReplicaError, match="base model digest"):
        replica.attach(header)


def test_flower_app_defaults_make_a_valid_config():
    from flwr.common.config import flatten_dict

    with open("pyproject.toml", "rb") as fh:
        app_config = flatten_dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    config = config_from_flower(app_config)
    assert config.federation.rounds >= 1 and config.model.name == "minilm"
    from seedtune.shared.task.config import ConfigError
    with pytest.raises(ConfigError, match="federation.sample_rate must be in"):
        config_from_flower({**app_config, "federation.sample_rate": 2.0})


def test_a_node_cache_skips_the_pruning_pass_but_not_the_checks(tmp_path, replica):
    header = replica.make_header(Noise.gaussian(1.0))
    first = Replica.from_header(header, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = Replica.from_header(header, tmp_path)
    assert again.selection.digest() == first.selection.digest() and again.digest() == first.digest()
    header.trainable_digest = "0" * 64
    with pytest.raises(ReplicaError, match="trainable set digest"):
        Replica.from_header(header, tmp_path)
