"""A short soak (the same code as simulations/soak.py): faulty and malicious clients and server crashes, with
the figures the reliability issue asks for."""

from __future__ import annotations

from simulations.soak import MALICIOUS, soak


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
