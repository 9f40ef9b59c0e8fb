"""A short soak (the same code as simulations/soak.py): faulty and malicious clients and server crashes, with
the figures the reliability issue asks for."""

from __future__ import annotations

import pytest

from seedtune.simulations.soak import MALICIOUS, soak


def test_short_soak_survives_faults_attacks_and_crashes(tmp_path, capsys):
    out = soak(rounds=10, clients=10, model="tiny-encoder", run_dir=tmp_path, seed=3, dropout=0.2, crash=0.1,
               crash_rounds={3, 6})
    with capsys.disabled():
        print(f"\nsoak figures: injected {out['injected']}, rejected {out['rejected_by_kind']}, "
              f"crashes survived {len(out['server_crashes'])}, accepted {out['accepted_replies']}/"
              f"{out['instructed_replies']} replies")
    assert {c["committed_rounds"] for c in out["server_crashes"]} == {2, 5}  # killed mid-round: nothing of it kept
    assert out["rounds_committed_once_in_order"] and out["ledger_verified"] and out["replay_digest_matches"]
    assert out["clients_agree"]
    rejected = out["rejected_by_kind"]
    # Every malicious reply that reached the server was rejected by name, except in-range poisoning, which
    # trimmed_mean drops instead (tested in test_federation) and replays on their first round (still honest).
    for role, kind in (("non_finite", "non_finite"), ("huge", "out_of_range"), ("garbage", "malformed")):
        assert rejected.get(kind, 0) >= out["injected"][role] - 2, (role, rejected)  # minus crashed rounds
    assert rejected.get("duplicate", 0) >= 1 and rejected.get("wrong_round", 0) >= 1
    assert set(MALICIOUS) <= set(out["injected"])
    assert out["epsilon_max"] <= 8.0


@pytest.mark.slow
def test_accuracy_still_rises_with_dropouts_crashes_and_a_server_restart(tmp_path, capsys):
    """MiniLM, the main job's settings, 30% of honest replies lost, 10% crashing, one server crash."""
    out = soak(rounds=10, clients=10, model="minilm", run_dir=tmp_path, seed=5, dropout=0.3, crash=0.1,
               crash_rounds={4}, lr=3e-3, eval_every=1, malicious=(),
               overrides={"data.train_size": 4000, "federation.local_steps": 10, "federation.sample_rate": 0.08,
                          "federation.clients_per_round": 5, "federation.min_replies": 1, "eval.dev_size": 512,
                          "federation.aggregation": "mean", "privacy.epsilon": 3.0, "data.test_size": 0})
    with capsys.disabled():
        print(f"\ndropout run: injected {out['injected']}, accepted {out['accepted_replies']}/"
              f"{out['instructed_replies']}, dev {out['dev_accuracy_by_round']}, test "
              f"{out['zero_shot_test_accuracy']:.4f} -> {out['test_accuracy']:.4f}")
    assert out["ledger_verified"] and out["replay_digest_matches"] and out["clients_agree"]
    assert out["test_accuracy"] > out["zero_shot_test_accuracy"] + 0.01
