"""Pinned nodes (issue 20): only the holders and keys on ``federation.allowed_nodes`` take part. A rogue node
that registered a key of its own gets no instruction and nothing of the ledger, its replies move nothing, a
listed node cannot speak for another holder, and an identity or a reply not signed by the pinned key counts for
nothing. Real SuperNodes behind a real SuperLink: tests/test_flower.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import Message

from seedtune.server.federation import FederatedServer
from seedtune.server.round import Rejected, validate_identity
from seedtune.shared.task.config import ConfigError
from seedtune.shared.protocol.identity import AllowedNodes, IdentityError, SigningKey, public_line, sign_reply
from seedtune.shared.protocol.ledger import Ledger, LedgerError
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Challenge, Identity, Instruction, Reply
from seedtune.shared.protocol.wire import from_content, to_content
from seedtune.simulations.inprocess import InProcessGrid
from tests.test_federation import fed_config

HONEST = 3


def write_key(path: Path, kind: str = "ecdsa") -> str:
    """A private key file as ssh-keygen writes it (OpenSSH format); returns its public key line."""
    key = ec.generate_private_key(ec.SECP384R1()) if kind == "ecdsa" else ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    return public_line(key)


def pinned_grid(tmp: Path, rogue: dict | None = None) -> tuple[InProcessGrid, Path]:
    """HONEST nodes whose keys are on the list (one of them Ed25519), and optionally one more node (``rogue``:
    its node config) that is not."""
    lines, configs = [], {}
    for i in range(HONEST):
        holder = f"holder-{i}"
        line = write_key(tmp / f"node_{i}", "ed25519" if i == 2 else "ecdsa")
        lines.append(f"{holder} {line} node_{i}@site-{i}  # comment")
        configs[i] = {"holder": holder, "node-key": str(tmp / f"node_{i}")}
    if rogue is not None:
        configs[HONEST] = rogue
    allowed = tmp / "allowed_nodes"
    allowed.write_text("# the federation's members\n\n" + "\n".join(lines) + "\n")
    return InProcessGrid(HONEST + (rogue is not None), node_configs=configs), allowed


def pinned_server(tmp: Path, grid: InProcessGrid, allowed: Path, **extra) -> FederatedServer:
    return FederatedServer(fed_config(tmp / "run", **{"federation.allowed_nodes": str(allowed), **extra}), grid,
                           tmp / "run")


def test_a_rogue_node_with_a_self_registered_key_gets_nothing_and_its_replies_move_nothing(tmp_path):
    """The rogue registered its own key with the SuperLink (Flower lets it) and claims an honest holder's name.
    It is asked who it is and nothing else: no instruction, no ledger tail, no header; the replies it pushes
    anyway are rejected before aggregation, and the run completes with every honest node in agreement."""
    write_key(tmp_path / "rogue")
    grid, allowed = pinned_grid(tmp_path, rogue={"holder": "holder-0", "node-key": str(tmp_path / "rogue")})
    rogue = grid.get_node_ids()[HONEST]
    server = pinned_server(tmp_path, grid, allowed, **{"federation.rounds": 2})
    forged = []
    deliver = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        replies = deliver(messages, timeout=timeout)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train:  # the rogue answers a round it was never sent, with in-range extreme scalars, signed by itself
            ins = from_content(train[0].content, Instruction)
            reply = Reply(protocol_version=PROTOCOL_VERSION, run_id=ins.run_id, round=ins.round, node=rogue,
                          model_version=ins.model_version, holder="holder-0",
                          scalars=np.full(len(ins.seeds), 0.99 * server.bound, "<f4").tobytes())
            sign_reply(reply, SigningKey.load(tmp_path / "rogue"))
            to_rogue = Message(train[0].content, dst_node_id=rogue, message_type="train",
                               group_id=train[0].metadata.group_id)
            forged.append(ins.round)
            replies.append(Message(to_content(reply), reply_to=to_rogue))
        return replies

    grid.send_and_receive = send_and_receive
    summary = server.run()

    to_rogue = [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == rogue]
    assert to_rogue == ["query.identify"]  # asked once, refused, never asked again, never sent the ledger
    assert summary["refused_identities"] == [rogue] and summary["pinned_nodes"] == HONEST
    assert summary["clients_agree"] and len(summary["client_digests"]) == HONEST
    ledger = Ledger.open(tmp_path / "run" / "ledger.sqlite")
    assert ledger.header.allowed_nodes == AllowedNodes.load(allowed).digest
    assert ledger.verify() == 2 * 2  # each round's coefficients follow from its accepted scalars alone
    assert forged
    for rnd in (1, 2):
        rows = ledger.replies(rnd)
        assert sorted(p.node for p in rows if p.status == "accepted") == sorted(grid.get_node_ids()[:HONEST])
        assert [p.status for p in rows if p.node == rogue] == ["unknown_node"]
    assert {h for h in summary["epsilon_holders"]} == {f"holder-{i}" for i in range(HONEST)}


def test_a_reply_not_signed_by_the_pinned_key_is_rejected(tmp_path):
    """A reply in a pinned node's name whose signature is not its pinned key's (a relay that rewrote it, or a
    rogue that took over the node id) is rejected by name; an unpinned federation would have taken it."""
    grid, allowed = pinned_grid(tmp_path)
    server = pinned_server(tmp_path, grid, allowed, **{"federation.rounds": 1})
    victim = grid.get_node_ids()[1]
    other = SigningKey.load(tmp_path / "node_0")  # a key on the list, but holder-0's

    def rewrite(msg):
        if msg.metadata.message_type != "train" or msg.metadata.src_node_id != victim:
            return msg
        reply = from_content(msg.content, Reply)
        reply.scalars = np.full(len(reply.scalars) // 4, 0.99 * server.bound, "<f4").tobytes()
        sign_reply(reply, other)
        return Message(to_content(reply), reply_to=Message(msg.content, dst_node_id=victim, message_type="train",
                                                           group_id=msg.metadata.group_id))

    grid.tamper = rewrite
    row = server.run_round(1)
    assert row["rejected_by_kind"] == {"bad_signature": 1} and row["accepted"] == HONEST - 1


def test_a_listed_node_cannot_identify_as_another_holder(tmp_path):
    """holder-1's node claims holder-0 with its own (listed) key: refused, and holder-0's own node is not."""
    grid, allowed = pinned_grid(tmp_path)
    grid.contexts[grid.get_node_ids()[1]].node_config["holder"] = "holder-0"
    server = pinned_server(tmp_path, grid, allowed)
    server.holders.identify(grid.get_node_ids(), server.courier, server.ledger.genesis.hex(), 1)
    ids = grid.get_node_ids()
    assert server.holders.of == {ids[0]: "holder-0", ids[2]: "holder-2"} and server.holders.strangers == {ids[1]}


def _answer(grid: InProcessGrid, node: int, challenge: Challenge) -> Message:
    from seedtune.client.app import identify

    msg = Message(to_content(challenge), dst_node_id=node, message_type="query.identify", group_id="1")
    return identify(msg, grid.contexts[node])


def test_an_identity_is_valid_for_its_own_challenge_only(tmp_path):
    """A recorded identity, answered again to a fresh nonce or another run, is refused: the signature covers
    the run, the node id, the ledger and the nonce."""
    grid, allowed = pinned_grid(tmp_path)
    pins, node = AllowedNodes.load(allowed), grid.get_node_ids()[0]
    challenge = Challenge(protocol_version=PROTOCOL_VERSION, run_id=7, header_digest="ab" * 32, nonce=os.urandom(32))
    answer = _answer(grid, node, challenge)
    assert validate_identity(answer, challenge, [node], pins) == "holder-0"
    for changed in ({"nonce": os.urandom(32)}, {"header_digest": "cd" * 32}):
        other = Challenge(protocol_version=PROTOCOL_VERSION, run_id=7, **{"header_digest": "ab" * 32,
                                                                         "nonce": challenge.nonce, **changed})
        with pytest.raises(Rejected) as exc:
            validate_identity(answer, other, [node], pins)
        assert exc.value.kind == "bad_signature"
    identity = from_content(answer.content, Identity)
    identity.ClearField("public_key")  # a node with no key cannot join a pinned federation
    with pytest.raises(Rejected, match="set node-key"):
        validate_identity(Message(to_content(identity), reply_to=Message(answer.content, dst_node_id=node,
                                                                        message_type="query.identify")),
                          challenge, [node], pins)
    # Without pins the same answer only states a holder
    assert validate_identity(answer, challenge, [node], None) == "holder-0"


def test_a_node_with_an_unusable_key_refuses_by_name(tmp_path):
    grid, allowed = pinned_grid(tmp_path)
    node = grid.get_node_ids()[0]
    (tmp_path / "node_0").write_text("not a key\n")
    challenge = Challenge(protocol_version=PROTOCOL_VERSION, run_id=7, header_digest="ab" * 32, nonce=b"n" * 32)
    identity = from_content(_answer(grid, node, challenge).content, Identity)
    assert "node-key" in identity.refusal and str(tmp_path / "node_0") in identity.refusal
    server = pinned_server(tmp_path, grid, allowed)
    server.holders.identify(grid.get_node_ids(), server.courier, server.ledger.genesis.hex(), 1)
    assert node not in server.holders.of and node not in server.holders.strangers  # asked again next round


@pytest.mark.parametrize("text, message", [
    ("", "lists no node"),
    ("holder-0\n", "line 1: expected 'HOLDER KEY-TYPE BASE64"),
    ("holder-0 ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x\n", "line 1: not an OpenSSH public key"),
    ("holder-0 {k0}\nholder-0 {k1}\n", "line 2: holder 'holder-0' is listed twice"),
    ("holder-0 {k0}\nholder-1 {k0}\n", "line 2: this key is already listed for 'holder-0'"),
])
def test_a_bad_allowed_nodes_file_is_a_named_error_before_anything_is_written(tmp_path, text, message):
    keys = {f"k{i}": write_key(tmp_path / f"k{i}") for i in range(2)}
    allowed = tmp_path / "allowed"
    allowed.write_text(text.format(**keys))
    with pytest.raises(IdentityError, match=message):
        AllowedNodes.load(allowed)
    with pytest.raises(ConfigError, match=message):
        pinned_server(tmp_path, InProcessGrid(1), allowed)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="cannot read"):
        pinned_server(tmp_path, InProcessGrid(1), tmp_path / "missing")


def test_a_resume_refuses_another_list_of_pinned_nodes(tmp_path):
    grid, allowed = pinned_grid(tmp_path)
    server = pinned_server(tmp_path, grid, allowed, **{"federation.rounds": 2})
    server.run_round(1)
    server.ledger.close()
    allowed.write_text(allowed.read_text() + f"holder-9 {write_key(tmp_path / 'new')}\n")
    with pytest.raises(LedgerError, match="different allowed_nodes"):
        pinned_server(tmp_path, grid, allowed, **{"federation.rounds": 2})


def test_an_unpinned_federation_sends_no_signatures(tmp_path):
    """Without federation.allowed_nodes nothing changes on the wire: nodes without a key sign nothing, and their
    identities state a holder only."""
    grid = InProcessGrid(2)
    replies = []
    grid.tamper = lambda msg: replies.append(msg) or msg
    server = FederatedServer(fed_config(tmp_path, **{"federation.rounds": 1}), grid, tmp_path)
    assert server.run_round(1)["accepted"] == 2 and server.ledger.header.allowed_nodes == ""
    assert sorted(server.holders.of.values()) == ["partition-0-of-2", "partition-1-of-2"]
    identities = [from_content(m.content, Identity) for m in replies if m.metadata.message_type == "query.identify"]
    train = [from_content(m.content, Reply) for m in replies if m.metadata.message_type == "train"]
    assert len(identities) == len(train) == 2
    assert not any(i.signature or i.public_key for i in identities) and not any(r.signature for r in train)
