"""Flower's evaluate path: nodes score the final model on their own held-out data and release noised label
counts, accounted in their holders' privacy ledgers; the server sums them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from seedtune.client.app import NodeConfigError, _heldout_source
from seedtune.client.privacy_ledger import heldout_budget, open_privacy_ledger
from seedtune.server.federation import FederatedServer
from seedtune.shared.task.config import ConfigError, load_config
from seedtune.shared.task.tasks import classification_metrics, counts_metrics, label_counts
from seedtune.simulations.inprocess import InProcessGrid
from tests.test_federation import NODES, fed_config


def test_metrics_from_exact_counts_are_the_classification_metrics_and_noised_counts_are_clamped():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    counts = label_counts(predicted, labels, 3)
    assert counts.sum(0).tolist() == [50, 50, int((predicted == labels).sum())]
    assert counts_metrics(counts, ["a", "b", "c"]) == classification_metrics(predicted, labels, ["a", "b", "c"])
    noised = counts_metrics(np.array([[4.2, 3.9, 5.1], [-1.5, 0.4, -0.2]]), ["a", "b"])
    assert noised["per_label"]["a"] == {"examples": 4.2, "predicted": 3.9, "correct": 3.9}  # no more right than seen
    assert noised["per_label"]["b"] == {"examples": 0.0, "predicted": 0.4, "correct": 0.0}  # none below 0
    assert noised["accuracy"] == pytest.approx(3.9 / 4.2)
    assert noised["macro_f1"] == pytest.approx((2 * 3.9 / 8.1 + 0.0) / 2)


def _federation(tmp_path, name, epsilon):
    run_dir = tmp_path / name
    config = fed_config(run_dir, **{"federation.rounds": 1, "federation.node_evaluation": True,
                                    "federation.node_eval_epsilon": epsilon})
    grid = InProcessGrid(NODES)
    server = FederatedServer(config, grid, run_dir)
    return server, server.run()


def _heldout_keys(server):
    return [heldout_budget(f"partition-{i}-of-{NODES}") for i in range(NODES)]


def test_nodes_release_noised_counts_of_their_held_out_data_once_and_within_their_budget(tmp_path):
    server, summary = _federation(tmp_path, "a", 2.5)
    assert summary["node_eval_holders"] == summary["node_eval_asked"] == NODES
    per_label = summary["node_test_per_label"]
    assert set(per_label) == set(server.config.task.labels)
    released = [c[k] for c in per_label.values() for k in ("examples", "predicted", "correct")]
    assert not all(float(v).is_integer() for v in released)  # noised, not the exact counts
    assert 0.0 <= summary["node_test_accuracy"] <= 1.0 and 0.0 <= summary["node_test_macro_f1"] <= 1.0
    # every holder's ledger charges exactly one release to its held-out data, at the configured epsilon
    ledger, delta = open_privacy_ledger(), server.config.privacy.delta
    keys = _heldout_keys(server)
    assert [ledger.steps(k) for k in keys] == [1] * NODES
    spent = [ledger.epsilon(k, delta) for k in keys]
    assert all(2.4 < e <= 2.5 for e in spent)
    assert sorted(summary["node_eval_epsilon_holders"].values()) == pytest.approx(sorted(spent))
    assert summary["node_eval_epsilon_per_release"] == pytest.approx(spent[0])

    again = server.evaluate_nodes()  # a re-delivered evaluation: the stored replies, no second release
    assert again["node_test_per_label"] == per_label
    assert [ledger.steps(k) for k in keys] == [1] * NODES

    # a second release on the same held-out data would take every holder past its budget (3): refused
    _, second = _federation(tmp_path, "b", 2.5)
    assert second["node_eval_holders"] == 0 and second["node_eval_asked"] == NODES
    assert "node_test_accuracy" not in second
    assert [ledger.steps(k) for k in keys] == [1] * NODES


def test_a_node_without_held_out_data_refuses_by_name(tmp_path):
    own = tmp_path / "train.csv"
    own.write_text("text,label\nfine,positive\n")
    with pytest.raises(NodeConfigError, match="test-path"):
        _heldout_source(SimpleNamespace(node_config={"data-path": str(own), "holder": "h"}))
    with pytest.raises(NodeConfigError, match="holder"):
        _heldout_source(SimpleNamespace(node_config={"test-path": str(own)}))
    assert callable(_heldout_source(SimpleNamespace(node_config={"data-path": str(tmp_path), "holder": "h"})))


@pytest.mark.parametrize("overrides, message", [
    ({"privacy.enabled": False}, "privacy.enabled"),
    ({"task.kind": "generation", "task.target_field": "ref", "task.labels": [], "task.label_words": [],
      "task.label_prompts": []}, "classification"),
    ({"federation.node_eval_epsilon": 0.0}, "node_eval_epsilon"),
])
def test_node_evaluation_config_errors_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"federation.node_evaluation": True, **overrides})
