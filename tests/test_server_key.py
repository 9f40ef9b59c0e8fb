"""Nodes pin the federation, not a header (issue 32, finding 7; finding 8's stop).

The red team rewrote a server's ledger consistently: a new header (another created_utc), round 1's scalars
scaled, the last round dropped, every hash recomputed and the run folder's metrics rewritten to anchor the
forgery. `seedtune verify` passed and every node followed it as a new ledger. With ``federation.server_key``
the server signs each position it sends and each round it commits, and nodes configured with its public key
(node config ``server-key``) follow only signed positions and one ledger header per server key."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from seedtune import api
from seedtune.client.privacy_ledger import open_privacy_ledger
from seedtune.server.federation import FederatedServer, FederationHalted
from seedtune.shared.protocol.aggregation import RoundRule
from seedtune.shared.protocol.chain import ChainError
from seedtune.shared.protocol.identity import SigningKey
from seedtune.shared.protocol.ledger import Ledger, Provenance
from seedtune.shared.protocol.proto import LedgerHeader
from seedtune.simulations.inprocess import InProcessGrid
from tests.test_federation import NODES, STEPS, fed_config
from tests.test_identity import write_key


def server_key(tmp: Path, name: str = "server_key") -> tuple[Path, Path]:
    """A server's private key file and its .pub file."""
    key = tmp / name
    (tmp / f"{name}.pub").write_text(write_key(key, "ed25519") + "\n")
    return key, tmp / f"{name}.pub"


def pinning_grid(pub: Path, first_id: int = 1) -> InProcessGrid:
    return InProcessGrid(NODES, node_configs={i: {"server-key": str(pub)} for i in range(NODES)}, first_id=first_id)


def two_signed_rounds(tmp: Path, rounds: int = 3):
    key, pub = server_key(tmp)
    config = fed_config(tmp / "run", **{"federation.rounds": rounds, "federation.server_key": str(key)})
    server = FederatedServer(config, pinning_grid(pub), tmp / "run")
    for rnd in (1, 2):
        assert server.run_round(rnd)["accepted"] == NODES
    assert len(server.sync()[1]) == NODES  # every node followed round 2
    server.ledger.close()
    return config, key, pub


def forge(run: Path, key: Path | None, drop_last: bool = True) -> None:
    """The red team's rewrite: another header, round 1's scalars x3, the last round dropped (unless not
    ``drop_last``), every hash recomputed,
    metrics.jsonl anchoring the result; signed with ``key`` (an attacker holding the server's key and disk)
    or not at all (one holding the disk only)."""
    old = Ledger.open(run / "ledger.sqlite", read_only=True)
    header = LedgerHeader()
    header.CopyFrom(old.header)
    header.created_utc = "2020-01-01T00:00:00Z"
    rounds = old.rounds()[:-1] if drop_last else old.rounds()
    kept = [(r, [Provenance(p.node, p.holder, p.status, (3 * p.values()).astype("<f4").tobytes())
                 for p in old.replies(r["round"])],
             list(old.entries(r["first_index"], r["first_index"] + r["entries"])), old._instructions(r["round"]))
            for r in rounds]
    old.close()
    for leftover in run.glob("ledger.sqlite*"):
        leftover.unlink()
    forged = Ledger.create(run / "ledger.sqlite", header)
    sign = SigningKey.load(key, "forger").sign if key else None
    for r, replies, entries, instructions in kept:
        rule = RoundRule(r["rule"], r["lr"], r["trim"])
        forged.record_instructions(r["round"], [h for h, _, _ in instructions], instructions[0][1])
        coeffs = rule.coefficients(np.stack([p.values() for p in replies if p.status == "accepted"]))
        forged.commit_round(r["round"], [e.seed for e in entries], coeffs, replies, rule, r["metrics"], sign)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r["round"], "ledger_record":
                                                           forged.record_at(r["round"]).hex()}) + "\n"
                                               for r, *_ in kept))
    forged.close()


def test_a_rewrite_without_the_server_key_is_refused_by_the_resumed_server_and_by_verify(tmp_path):
    config, _, pub = two_signed_rounds(tmp_path)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    forge(tmp_path / "run", key=None)
    ledger = tmp_path / "run" / "ledger.sqlite"
    assert api.verify(ledger)["signed_rounds"] is None  # the chains alone cannot tell (what the red team saw)
    with pytest.raises(ChainError, match="round 1 carries no signature"):
        api.verify(ledger, server_key=pub)
    with pytest.raises(ChainError, match="round 1 carries no signature, where federation.server_key"):
        FederatedServer(config, pinning_grid(pub, first_id=40), tmp_path / "run")
    other, _ = server_key(tmp_path, "another_key")  # signed, but not by this server
    forge(tmp_path / "copy", key=other)
    with pytest.raises(ChainError, match="round 1 is not signed by --server-key"):
        api.verify(tmp_path / "copy" / "ledger.sqlite", server_key=pub)


def test_a_rewrite_signed_with_the_stolen_key_is_refused_by_every_node_as_a_fork(tmp_path, caplog):
    config, key, pub = two_signed_rounds(tmp_path)
    released = {k: open_privacy_ledger().steps(k) for k in open_privacy_ledger().keys()}
    forge(tmp_path / "run", key=key)
    assert api.verify(tmp_path / "run" / "ledger.sqlite", server_key=pub)["signed_rounds"] == 1
    restored = FederatedServer(config, pinning_grid(pub, first_id=40), tmp_path / "run")  # new node processes
    with pytest.raises(FederationHalted, match=f"every node that answered .{NODES}. refused this server's ledger"):
        restored.run()
    assert caplog.text.count("another header from the same server is a fork") >= NODES
    assert restored.ledger.last_round == 1 and not (tmp_path / "run" / "summary.json").exists()
    assert {k: open_privacy_ledger().steps(k) for k in open_privacy_ledger().keys()} == released


def test_a_pinning_node_refuses_unsigned_or_foreign_positions_and_follows_signed_ones(tmp_path, caplog):
    key, pub = server_key(tmp_path)
    other, _ = server_key(tmp_path, "another_key")
    for run, extra in (("unsigned", {}), ("foreign", {"federation.server_key": str(other)})):
        server = FederatedServer(fed_config(tmp_path / run, **extra), pinning_grid(pub), tmp_path / run)
        with pytest.raises(FederationHalted, match=f"every node that answered .{NODES}. refused"):
            server.run_round(1)  # (a server started without its key, or with another, stops at once)
        assert server.ledger.last_round == 0
        server.ledger.close()
    assert caplog.text.count("is not signed by the server key this node pins") >= 2 * NODES
    server = FederatedServer(fed_config(tmp_path / "signed", **{"federation.server_key": str(key)}),
                             pinning_grid(pub), tmp_path / "signed")
    assert server.run_round(1)["accepted"] == NODES
    assert server.ledger.check_signatures(public=pub.read_text().strip()) == 1


def test_a_second_ledger_from_the_same_server_waits_for_the_node_operator(tmp_path, capsys):
    """A legitimate new federation from a pinned server looks like a fork to its nodes: its operator unpins the
    old ledger (``seedtune holder forget-server``), budgets and anchors kept, and the new one is followed."""
    from seedtune.cli import main

    key, pub = server_key(tmp_path)
    first = FederatedServer(fed_config(tmp_path / "a", **{"federation.server_key": str(key)}), pinning_grid(pub),
                            tmp_path / "a")
    assert first.run_round(1)["accepted"] == NODES
    config = fed_config(tmp_path / "b", **{"federation.server_key": str(key)})
    with pytest.raises(FederationHalted, match="refused this server's ledger"):
        FederatedServer(config, pinning_grid(pub, first_id=40), tmp_path / "b").run_round(1)
    holders = open_privacy_ledger()
    spent = {k: holders.steps(k) for k in holders.keys()}
    assert main(["holder", "forget-server", "--ledger", str(holders.path), "--server-key", str(pub)]) == 0
    assert json.loads(capsys.readouterr().out)["pins_removed"] == NODES
    second = FederatedServer(config, pinning_grid(pub, first_id=80), tmp_path / "b")
    assert second.run_round(1)["accepted"] == NODES
    assert all(holders.steps(k) > spent[k] for k in spent)  # the same budgets, spent further


def test_a_resumed_server_checks_its_own_signatures(tmp_path):
    """A round whose stored signature was damaged (or removed) stops the resume by its number."""
    config, _, pub = two_signed_rounds(tmp_path)
    conn = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    conn.execute("UPDATE signatures SET signature = X'00' WHERE round = 2")
    conn.commit()
    conn.close()
    with pytest.raises(ChainError, match="round 2 is not signed by federation.server_key"):
        FederatedServer(config, pinning_grid(pub, first_id=40), tmp_path / "run")


def test_the_signatures_cover_what_the_server_charged_each_holder(tmp_path):
    """A round's signature covers its round record, which chains its instructions and replies: deleting what
    the server recorded it asked of the holders (its epsilon, the model card's) and recomputing the round chain
    passes the chains but not the signatures (review of issue 32's fix: the signature covered the position only)."""
    from seedtune.shared.protocol.ledger import round_record

    _, _, pub = two_signed_rounds(tmp_path)
    path = tmp_path / "run" / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM instructions WHERE round = 1")
    conn.commit()
    ledger = Ledger.open(path, read_only=True)
    record, rows = ledger.genesis, []
    for rnd in (1, 2):
        row = conn.execute("SELECT round, first_idx, count, head, rule, lr, trim, committed_utc, metrics FROM rounds "
                           "WHERE round = ?", (rnd,)).fetchone()
        record = round_record(record, row, ledger.replies(rnd), ledger._instructions(rnd))
        rows.append((record, rnd))
    conn.executemany("UPDATE records SET hash = ? WHERE round = ?", rows)
    conn.commit()
    conn.close()
    assert ledger.verify() == 2 * STEPS and set(ledger.instructed_steps().values()) == {STEPS}  # chains pass
    with pytest.raises(ChainError, match="round 1 is not signed by the server key"):
        ledger.check_signatures(pub.read_text().strip())


def test_a_holder_pins_the_first_signed_header_it_sees_atomically(tmp_path):
    holders = open_privacy_ledger(tmp_path / "holders.sqlite", create=True)
    assert holders.pin_server("h", "key", "aa") == "aa" and holders.pin_server("h", "key", "bb") == "aa"
    assert holders.pin_server("other", "key", "bb") == "bb" and holders.forget_server("key", "h") == 1
    assert holders.pin_server("h", "key", "bb") == "bb"


def test_a_server_whose_nodes_all_refuse_the_final_sync_writes_no_summary(tmp_path, caplog):
    """A forged ledger with every round kept: the resumed server has no round left and goes straight to the
    final sync, which every node refuses as a fork; it stops there rather than write a summary."""
    config, key, pub = two_signed_rounds(tmp_path, rounds=2)
    forge(tmp_path / "run", key=key, drop_last=False)
    restored = FederatedServer(config, pinning_grid(pub, first_id=40), tmp_path / "run")
    with pytest.raises(FederationHalted, match=f"every node asked in the final sync .{NODES}. refused"):
        restored.run()
    assert not (tmp_path / "run" / "summary.json").exists()
