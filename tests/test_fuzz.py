"""Property-based tests (hypothesis): whatever bytes or fields a reply carries, the server's validation either
accepts well-formed scalars of the plan's round, version, node and holder, or rejects the reply with a named
reason; any sequence of rounds replays to the same weights, and tampering with an entry or with the provenance
its coefficient came from is detected."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seedtune.server.federation import FederatedServer
from seedtune.server.round import Rejected, validate
from seedtune.shared.protocol.aggregation import ACCEPTED, RoundRule
from seedtune.shared.protocol.ledger import Ledger, Provenance
from seedtune.shared.protocol.chain import ChainError
from seedtune.shared.task.config import load_config
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.protocol.proto import PROTOCOL_VERSION, Reply
from seedtune.shared.engine.replica import Replica
from seedtune.shared.protocol.wire import to_content
from seedtune.simulations.inprocess import InProcessGrid
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
        reply, scalars = validate(msg, plan, server.grid.run.run_id, server.holders.of[src], set(), server.bound)
    except Rejected as exc:
        assert exc.kind in KINDS and str(exc)
        with pytest.raises(Rejected) as again:  # pure: the same reply, the same verdict
            validate(msg, plan, server.grid.run.run_id, server.holders.of[src], set(), server.bound)
        assert again.value.kind == exc.kind
    else:
        assert len(scalars) == len(plan.seeds) and np.all(np.isfinite(scalars))
        assert np.all(np.abs(scalars) <= server.bound)
        assert (reply.round, reply.model_version, reply.node, reply.holder, reply.refusal) == (
            plan.round, plan.version, src, server.holders.of[src], "")
        with pytest.raises(Rejected, match="a second reply"):  # and a node is accepted once per round
            validate(msg, plan, server.grid.run.run_id, server.holders.of[src], {src}, server.bound)


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
                  holder=srv.holders.of[plan.nodes[0]] if own_holder else "someone-else",
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


TABLE_COLUMNS = {"meta": ("key", "value"), "entries": ("idx", "round", "seed", "coeff", "hash"),
                 "replies": ("round", "node", "holder", "status", "scalars"),
                 "instructions": ("round", "holder", "steps", "sent_utc"),
                 "rounds": ("round", "first_idx", "count", "head", "rule", "lr", "trim", "committed_utc", "metrics"),
                 "records": ("round", "hash")}


def _random_value(rng: np.random.Generator):
    kind = int(rng.integers(6))
    return [None, int(rng.integers(-2**63, 2**63 - 1)), float(rng.normal() * 10.0 ** rng.integers(-5, 40)),
            float(rng.choice([np.nan, np.inf, -np.inf])), "x" * int(rng.integers(9)),
            rng.bytes(int(rng.integers(41)))][kind]


def _random_mutation(rng: np.random.Generator, size: int) -> tuple:
    kind = ("flip", "truncate", "edit", "delete")[int(rng.integers(4))]
    table = sorted(TABLE_COLUMNS)[int(rng.integers(len(TABLE_COLUMNS)))]
    if kind == "flip":
        return kind, int(rng.integers(size)), int(rng.integers(1, 256))
    if kind == "truncate":
        return kind, int(rng.integers(size))
    if kind == "edit":
        column = TABLE_COLUMNS[table][int(rng.integers(len(TABLE_COLUMNS[table])))]
        return kind, table, column, int(rng.integers(1, 13)), _random_value(rng)
    return kind, table, int(rng.integers(1, 13))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, replica):
    """A three-round ledger with instructions and provenance folded into one file, and its replay digest."""
    path = tmp_path_factory.mktemp("pristine") / "ledger.sqlite"
    ledger = Ledger.create(path, replica.make_header(Noise.gaussian(1.0)))
    rng = np.random.default_rng(0)
    rule = RoundRule("mean", 1.0)
    for rnd in (1, 2, 3):
        ledger.record_instructions(rnd, ["h0", "h1", "h2", "h9"], 4)
        seeds = [int(s) for s in rng.integers(0, 2**63, 4)]
        replies = [Provenance(n + 1, f"h{n}", ACCEPTED, rng.uniform(-1 / 64, 1 / 64, 4).astype("<f4").tobytes())
                   for n in range(3)] + [Provenance(9, "h9", "out_of_range")]
        ledger.commit_round(rnd, seeds, rule.coefficients(np.stack([p.values() for p in replies[:3]])), replies,
                            rule, {"accepted": 3})
    replica.attach(ledger.header)
    replica.apply(list(ledger.entries()), ledger.hash_at(len(ledger)))
    ledger.close()  # the last connection folds the WAL into the file
    return path.read_bytes(), replica.digest()


def _mutate(path, data: bytes, mutation: tuple) -> bool:
    """Write ``data`` to ``path`` with one mutation applied; False if it changed nothing (a row that does not
    exist, or an edit SQLite's constraints refuse)."""
    kind = mutation[0]
    if kind == "flip":
        at = mutation[1]
        data = data[:at] + bytes([data[at] ^ mutation[2]]) + data[at + 1:]
    elif kind == "truncate":
        data = data[: mutation[1]]
    path.write_bytes(data)
    if kind in ("flip", "truncate"):
        return True
    conn = sqlite3.connect(path)
    try:
        if kind == "edit":
            _, table, column, rowid, value = mutation
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (value, rowid))
        else:
            conn.execute(f"DELETE FROM {mutation[1]} WHERE rowid = ?", (mutation[2],))
        conn.commit()
        return conn.total_changes > 0
    except sqlite3.IntegrityError:  # a duplicate primary key, or NULL where NOT NULL
        return False
    finally:
        conn.close()


def _outcome(path, replica, digest: str) -> str:
    """A named refusal, or a ledger that verifies and replays to the pristine model: nothing else."""
    from seedtune.shared.engine.follower import ReplicaError
    from seedtune.shared.protocol.ledger import LedgerError

    try:
        ledger = Ledger.open(path)
        try:
            n = ledger.verify()
            replica.attach(ledger.header)
            replica.apply(list(ledger.entries()), ledger.hash_at(n))
        finally:
            ledger.close()
    except (LedgerError, ChainError, ReplicaError) as exc:
        assert str(exc)
        return type(exc).__name__
    assert replica.digest() == digest, "a damaged ledger verified and replayed to another model"
    return "verified"


def fuzz_ledger(folder, replica, pristine, cases: int, seed: int) -> dict[str, int]:
    """``cases`` random mutations of the pristine file (byte flips, truncations, row edits and deletions in
    every table); returns the outcome counts. Any other outcome fails, naming the mutation."""
    data, digest = pristine
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for case in range(cases):
        mutation = _random_mutation(rng, len(data))
        path = folder / f"case{case}.sqlite"
        try:
            result = _outcome(path, replica, digest) if _mutate(path, data, mutation) else "unchanged"
        except Exception as exc:
            raise AssertionError(f"case {case}, mutation {mutation!r:.200}: {type(exc).__name__}: {exc}") from exc
        for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        key = f"{mutation[0]}:{result}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_damaged_ledger_file_is_refused_by_name_or_replays_to_the_same_model(tmp_path, replica, pristine):
    counts = fuzz_ledger(tmp_path, replica, pristine, cases=300, seed=20)
    print("ledger fuzz outcomes:", json.dumps(counts, sort_keys=True))
    for kind in ("flip", "truncate", "edit", "delete"):  # every kind of damage was met, and refused
        assert sum(n for k, n in counts.items() if k.startswith(kind) and not k.endswith(("verified", "unchanged")))


@pytest.mark.slow
def test_ledger_fuzz_long(tmp_path, replica, pristine):
    counts = fuzz_ledger(tmp_path, replica, pristine, cases=5000, seed=2020)
    print("ledger fuzz outcomes (5,000 cases):", json.dumps(counts, sort_keys=True))
