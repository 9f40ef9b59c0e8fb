"""Property-based tests (hypothesis): whatever bytes or fields a reply carries, the server's validation either
accepts well-formed scalars of the plan's round, version, node and holder, or rejects the reply with a named
reason; any sequence of rounds replays to the same weights, and tampering with an entry or with the provenance
its coefficient came from is detected."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.federation import FederatedServer
from server.round import Rejected, validate
from shared.aggregation import ACCEPTED, RoundRule
from shared.ledger import Ledger, Provenance
from shared.chain import ChainError
from shared.config import load_config
from shared.noise import Noise
from shared.proto import PROTOCOL_VERSION, Reply
from shared.replica import Replica
from shared.wire import to_content
from simulations.inprocess import InProcessGrid
from tests.test_federation import STEPS, fed_config

KINDS = {"unknown_node", "client_error", "malformed", "oversized", "refused", "wrong_round", "duplicate",
         "wrong_version", "wrong_count", "non_finite", "out_of_range", "wrong_holder"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz")
    grid = InProcessGrid(2)
    srv = FederatedServer(fed_config(run_dir, **{"federation.rounds": 1}), grid, run_dir)
    return srv, srv.configure(1)


def _reply_message(plan, content: RecordDict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=plan.nodes[0], message_type="train", group_id="1")
    return Message(content, reply_to=instruction)


def _check(server, plan, msg) -> None:
    src = msg.metadata.src_node_id
    try:
        reply, scalars = validate(msg, plan, server.grid.run.run_id, server.holders[src], set(), server.bound)
    except Rejected as exc:
        assert exc.kind in KINDS and str(exc)
        with pytest.raises(Rejected) as again:  # pure: the same reply, the same verdict
            validate(msg, plan, server.grid.run.run_id, server.holders[src], set(), server.bound)
        assert again.value.kind == exc.kind
    else:
        assert len(scalars) == len(plan.seeds) and np.all(np.isfinite(scalars))
        assert np.all(np.abs(scalars) <= server.bound)
        assert (reply.round, reply.model_version, reply.node, reply.holder, reply.refusal) == (
            plan.round, plan.version, src, server.holders[src], "")
        with pytest.raises(Rejected, match="a second reply"):  # and a node is accepted once per round
            validate(msg, plan, server.grid.run.run_id, server.holders[src], {src}, server.bound)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=4096))
def test_arbitrary_payload_bytes_are_accepted_or_rejected_by_name(server, payload):
    srv, plan = server
    _check(srv, plan, _reply_message(plan, RecordDict({"seedtune": ConfigRecord({"payload": payload})})))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(protocol=st.sampled_from([PROTOCOL_VERSION, 0, 2, 2**32 - 1]), round_=st.integers(0, 3),
       version=st.integers(0, 2**64 - 1) | st.just(0), node_is_src=st.booleans(),
       scalars=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=2 * STEPS),
       refusal=st.sampled_from(["", "budget"]), own_holder=st.booleans())
def test_arbitrary_reply_fields_are_accepted_or_rejected_by_name(server, protocol, round_, version, node_is_src,
                                                                 scalars, refusal, own_holder):
    srv, plan = server
    reply = Reply(protocol_version=protocol, run_id=srv.grid.run.run_id, round=round_, model_version=version,
                  node=plan.nodes[0] if node_is_src else plan.nodes[0] ^ 1,
                  holder=srv.holders[plan.nodes[0]] if own_holder else "someone-else",
                  scalars=np.asarray(scalars, dtype="<f4").tobytes(), refusal=refusal)
    _check(srv, plan, _reply_message(plan, to_content(reply)))


@pytest.fixture(scope="module")
def replica() -> Replica:
    return Replica(load_config(None, {"model.name": "tiny-encoder"}))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.floats(-1 / 128, 1 / 128, width=32)),
                                max_size=5), min_size=1, max_size=4),
       rule=st.sampled_from(["mean", "median", "trimmed_mean"]), tamper=st.integers(0, 10_000))
def test_ledger_replay_and_tamper_detection(tmp_path_factory, replica, rounds, rule, tamper):
    path = tmp_path_factory.mktemp("ledger") / "l.sqlite"
    ledger = Ledger.create(path, replica.make_header(Noise.gaussian(1.0)))
    replica.attach(ledger.header)
    for rnd, steps in enumerate(rounds, start=1):
        seeds = [seed for seed, _ in steps]
        own = np.array([s for _, s in steps], dtype="<f4")
        replies = [Provenance(n + 1, f"h{n}", ACCEPTED, (own * np.float32(n - 1)).tobytes()) for n in range(3)]
        rule_ = RoundRule(rule, 1.0, 0.34)
        coeffs = rule_.coefficients(np.stack([p.values() for p in replies])) if steps else []
        entries = ledger.commit_round(rnd, seeds, coeffs, replies if steps else [], rule_)
        replica.apply(entries, ledger.hash_at(len(ledger)))
    live = replica.digest()
    replica.attach(ledger.header)
    replica.catch_up(ledger.tail(0))
    assert replica.digest() == live and ledger.verify() == sum(map(len, rounds))
    n = len(ledger)
    ledger.close()
    if n:
        idx = tamper % n
        conn = sqlite3.connect(path)
        if tamper % 2:
            conn.execute("UPDATE entries SET coeff = coeff * 2 + 1e-3 WHERE idx = ?", (idx,))
            message = f"entry {idx} "
        else:  # the provenance of the round holding entry idx: every scalar becomes 0.25 (|a real one| <= 1/64)
            rnd = conn.execute("SELECT round FROM entries WHERE idx = ?", (idx,)).fetchone()[0]
            conn.execute("UPDATE replies SET scalars = ? WHERE round = ?",
                         (np.full(len(rounds[rnd - 1]), 0.25, "<f4").tobytes(), rnd))
            message = f"coefficients of round {rnd} do not follow"
        conn.commit()
        conn.close()
        with pytest.raises(ChainError, match=message):
            Ledger.open(path).verify()
