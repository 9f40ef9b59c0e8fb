"""Secure aggregation end to end (federation.secure_aggregation = "secagg+") over the in-process transport: the
real server loop and ClientApp handlers, SecAgg+ with distributed Skellam noise, on the tiny encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from scipy import stats

import seedtune.client.secure_round as secure_round
from seedtune.client.privacy_ledger import open_privacy_ledger
from seedtune.server.federation import FederatedServer
from seedtune.shared.privacy.noise import Skellam
from seedtune.shared.protocol.aggregation import MASKED, SECURE_SUM
from seedtune.shared.protocol.ledger import Ledger, Provenance, check_feeds
from seedtune.shared.protocol.proto import Reply
from seedtune.shared.protocol.wire import SECURE, TRAIN, from_content, to_content
from seedtune.shared.task.config import ConfigError
from seedtune.simulations.inprocess import InProcessGrid
from tests.test_federation import fed_config

NODES, STEPS, ROOT = 3, 24, Path(__file__).resolve().parents[1]
SECURE_RUN = {"privacy.noise_multiplier": 0.0, "federation.secure_aggregation": "secagg+",
              "federation.min_replies": 2, "federation.secure_batch": 20.0, "federation.local_steps": STEPS,
              "federation.rounds": 2}


class Recorder:
    """Every message the server receives (by the message type it answers) and every vector a node masks."""

    def __init__(self, grid: InProcessGrid, monkeypatch: pytest.MonkeyPatch) -> None:
        self.received: list[tuple[str, Reply]] = []
        self.vectors: dict[tuple[int, int], np.ndarray] = {}  # (round, node) -> the node's quantised noised vector
        self.drop: set[tuple[int, int, int]] = set()  # (round, node, stage) replies lost in flight
        self.forge: set[tuple[int, int]] = set()  # (round, node) whose advertised keys are replaced in flight
        begin = secure_round.begin

        def recording(ins, node_id, *args, **kwargs):
            reply, state = begin(ins, node_id, *args, **kwargs)
            self.vectors[ins.round, node_id] = np.array(secure_round.Pending.from_bytes(state).vector)
            return reply, state

        monkeypatch.setattr(secure_round, "begin", recording)
        grid.tamper = self.tamper
        self.grid = grid

    def tamper(self, msg):
        asked = self.grid.sent[-1].metadata.message_type
        if asked not in (TRAIN, SECURE):
            return msg
        reply = from_content(msg.content, Reply)
        self.received.append((asked, reply))
        stage = 1 if reply.secure.HasField("keys") else 2 if reply.secure.shares else 3 if reply.secure.masked else 4
        if stage == 1 and (reply.round, reply.node) in self.forge:
            reply.secure.keys.encryption = b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"
            return Message(to_content(reply), reply_to=self.grid.sent[-1])
        return None if (reply.round, reply.node, stage) in self.drop else msg


@pytest.fixture(scope="module", params=[1, 4], ids=["one-direction", "four-directions"])
def secure_run(request, tmp_path_factory):
    """A secure run of one direction per step (the DP-ZO recipe: one Skellam coordinate, its exact PLD) or of
    four (as the head stage's frame: a K-coordinate Skellam release, its RDP bound)."""
    monkeypatch = pytest.MonkeyPatch()
    run_dir = tmp_path_factory.mktemp("secure")
    grid = InProcessGrid(NODES, privacy_ledger=str(run_dir / "holders.sqlite"))
    recorder = Recorder(grid, monkeypatch)
    server = FederatedServer(fed_config(run_dir, **SECURE_RUN, **{"zo.directions": request.param}), grid, run_dir)
    summary = server.run()
    monkeypatch.undo()
    return run_dir, recorder, server, summary


def test_the_server_sees_only_uniform_words_and_the_sum_is_the_nodes_quantised_noised_vectors(secure_run):
    run_dir, recorder, server, summary = secure_run
    masked = [r for _, r in recorder.received if r.secure.masked]
    assert len(masked) == 2 * NODES
    for _, reply in recorder.received:
        assert not reply.scalars  # no node's scalars in any message the server receives
    words = np.concatenate([np.frombuffer(r.secure.masked, dtype="<u8") for r in masked])
    for part in (words >> np.uint64(60), words & np.uint64(15)):  # top and bottom 4 bits: uniform
        assert stats.chisquare(np.bincount(part.astype(np.int64), minlength=16)).pvalue > 1e-4
    for reply in masked:  # and no masked vector is its node's own vector
        assert not np.array_equal(np.frombuffer(reply.secure.masked, dtype="<u8").view(np.int64),
                                  recorder.vectors[reply.round, reply.node])
    noise = Skellam.from_json(server.ledger.header.noise_params)
    assert isinstance(noise, Skellam) and noise.directions == server.config.zo.directions
    ledger = Ledger.open(run_dir / "ledger.sqlite", read_only=True)
    for rnd in (1, 2):
        rows = ledger.replies(rnd)
        assert sorted(p.status for p in rows) == [MASKED] * NODES + [SECURE_SUM]
        assert all(not p.scalars for p in rows if p.status == MASKED)  # the ledger keeps no node's scalars
        total = sum(recorder.vectors[rnd, node] for node in server.courier.live())
        unit = server.config.privacy.clip / (noise.sensitivity * 20.0 * NODES)
        expected = (total * unit).astype("<f4")
        aggregate = next(p for p in rows if p.status == SECURE_SUM).values()
        np.testing.assert_allclose(aggregate, expected, rtol=1e-6)
    ledger.close()


def test_a_secure_run_replays_verifies_and_its_nodes_agree(secure_run, tmp_path):
    run_dir, _, server, summary = secure_run
    assert summary["clients_agree"] and summary["epsilon_agree"]
    assert summary["noise"].startswith("skellam(")
    out = subprocess.run([sys.executable, "-m", "seedtune.cli", "replay", str(run_dir / "ledger.sqlite"),
                          "--out", str(tmp_path / "model")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["model_digest"] == summary["model_digest"]
    card = (tmp_path / "model" / "README.md").read_text()  # the card names the accountant and the trust it needs
    assert "- Secure aggregation: the server saw only each round's sums" in card
    assert ("RDP bound of a K-coordinate Skellam release" in card) == (server.config.zo.directions > 1)
    checked = subprocess.run([sys.executable, "-m", "seedtune.cli", "verify", str(run_dir / "ledger.sqlite")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout.strip().splitlines()[-1])["secure_rounds"] == 2


def test_each_holder_records_its_central_and_its_local_epsilon(secure_run):
    run_dir, _, _, summary = secure_run
    ledger = open_privacy_ledger(run_dir / "holders.sqlite")
    spent = {row["budget"]: row["epsilon"] for row in ledger.summary(1e-5)}
    for holder, central in summary["epsilon_holders"].items():
        assert spent[holder] == pytest.approx(central) and central <= 3.0
        # its own share of the noise alone (min_replies = 2: half the variance, about sqrt(2) the epsilon)
        # protects it less
        assert spent[secure_round.local_budget(holder)] > 1.3 * central


def test_a_node_that_drops_after_sharing_leaves_the_round_to_the_survivors(tmp_path, monkeypatch):
    grid = InProcessGrid(NODES, privacy_ledger=str(tmp_path / "holders.sqlite"))
    recorder = Recorder(grid, monkeypatch)
    gone = sorted(grid.contexts)[1]
    recorder.drop = {(1, gone, 3)}  # its masked vector is lost, after its shares went out
    server = FederatedServer(fed_config(tmp_path / "run", **{**SECURE_RUN, "federation.rounds": 1}), grid,
                             tmp_path / "run")
    server.run()
    rows = server.ledger.replies(1)
    assert {p.node: p.status for p in rows if p.node} == {n: "dropped" if n == gone else MASKED for n in grid.contexts}
    noise = server.noise
    assert isinstance(noise, Skellam)
    total = sum(recorder.vectors[1, n] for n in grid.contexts if n != gone)
    aggregate = next(p for p in rows if p.status == SECURE_SUM).values()
    unit = server.config.privacy.clip / (noise.sensitivity * 20.0 * 2)
    np.testing.assert_allclose(aggregate, (total * unit).astype("<f4"), rtol=1e-6)
    assert len(server.ledger) == STEPS


def test_fewer_survivors_than_min_replies_commit_nothing(tmp_path, monkeypatch):
    grid = InProcessGrid(NODES, privacy_ledger=str(tmp_path / "holders.sqlite"))
    recorder = Recorder(grid, monkeypatch)
    recorder.drop = {(1, n, 3) for n in sorted(grid.contexts)[:2]}
    server = FederatedServer(fed_config(tmp_path / "run", **{**SECURE_RUN, "federation.rounds": 1}), grid,
                             tmp_path / "run")
    server.run()
    assert len(server.ledger) == 0
    assert not [p for p in server.ledger.replies(1) if p.status in (MASKED, SECURE_SUM)]


@pytest.mark.parametrize("extra, key", [
    ({"federation.aggregation": "median"}, "federation.aggregation"),
    ({"federation.aggregation": "trimmed_mean"}, "federation.aggregation"),
    ({"federation.min_replies": 1}, "federation.min_replies"),
    ({"privacy.noise_multiplier": 1.5}, "federation.secure_aggregation"),
    ({"privacy.enabled": False}, "federation.secure_aggregation"),
    ({"federation.clients_per_round": 1}, "federation.clients_per_round"),
    ({"federation.secure_degree": 4}, "federation.secure_degree")])
def test_what_a_masked_sum_cannot_give_is_refused_by_name(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        fed_config(tmp_path, **{**SECURE_RUN, **extra})


def test_a_node_advertising_a_malformed_key_is_refused_and_the_round_goes_on(tmp_path, monkeypatch):
    grid = InProcessGrid(NODES, privacy_ledger=str(tmp_path / "holders.sqlite"))
    recorder = Recorder(grid, monkeypatch)
    liar = sorted(grid.contexts)[0]
    recorder.forge = {(1, liar)}
    server = FederatedServer(fed_config(tmp_path / "run", **{**SECURE_RUN, "federation.rounds": 1}), grid,
                             tmp_path / "run")
    server.run()
    statuses = {p.node: p.status for p in server.ledger.replies(1) if p.node}
    assert statuses == {n: "malformed" if n == liar else MASKED for n in grid.contexts}
    assert len(server.ledger) == STEPS


def test_a_secure_ledger_takes_its_coefficients_from_one_aggregate_row_only():
    class Header:
        noise = "skellam"

    rows = [Provenance(1, "a", MASKED), Provenance(0, "", SECURE_SUM, bytes(8))]
    check_feeds(rows, Header())  # as a secure round writes it
    for bad in ([*rows, Provenance(2, "b", "accepted", bytes(8))], [*rows, Provenance(0, "", SECURE_SUM, bytes(8))],
                [Provenance(3, "c", SECURE_SUM, bytes(8))]):
        with pytest.raises(ValueError):
            check_feeds(bad, Header())
    Header.noise = "gaussian"
    with pytest.raises(ValueError, match="without secure aggregation"):
        check_feeds(rows, Header())


def test_a_node_that_does_not_trust_the_server_charges_its_own_share_of_the_noise(tmp_path, monkeypatch):
    """A deployed node's default: its budget is checked at its own share of the noise (what holds against any
    server), and the central view is recorded beside it; a trusting node charges the central noise. (Its own budget
    here is wide: at the federation's target of 3 its local epsilon would make it refuse the round.)"""
    grid = InProcessGrid(NODES, privacy_ledger=str(tmp_path / "holders.sqlite"),
                         node_configs={0: {"trust-secure-aggregation": False, "epsilon-budget": 50.0, "delta": 1e-5}})
    server = FederatedServer(fed_config(tmp_path / "run", **{**SECURE_RUN, "federation.rounds": 1}), grid,
                             tmp_path / "run")
    server.run()
    spent = {row["budget"]: row["epsilon"] for row in open_privacy_ledger(tmp_path / "holders.sqlite").summary(1e-5)}
    wary, trusting = "partition-0-of-3", "partition-1-of-3"
    assert spent[wary] == pytest.approx(spent[secure_round.local_budget(trusting)])  # the local guarantee
    assert spent[secure_round.central_budget(wary)] == pytest.approx(spent[trusting])  # the central one, beside
    assert spent[wary] > 1.3 * spent[trusting] and secure_round.local_budget(wary) not in spent


def test_a_node_refuses_a_header_whose_noise_is_accounted_for_other_directions(tmp_path, monkeypatch):
    """K coordinates released per step need the K-coordinate accounting: a header whose Skellam noise is accounted
    as one coordinate (the tighter PLD) for a four-direction federation would under-count every holder's release,
    so no node takes part and nothing is committed."""
    import seedtune.server.federation as federation

    calibrate = federation.calibrate_skellam
    monkeypatch.setattr(federation, "calibrate_skellam", lambda *args: calibrate(*args[:5], 1, *args[6:]))
    grid = InProcessGrid(NODES, privacy_ledger=str(tmp_path / "holders.sqlite"))
    server = FederatedServer(fed_config(tmp_path / "run", **{**SECURE_RUN, "federation.rounds": 1,
                                                              "zo.directions": 4}), grid, tmp_path / "run")
    assert Skellam.from_json(server.ledger.header.noise_params).directions == 1
    server.run()
    assert len(server.ledger) == 0
    assert all(p.status == "refused" for p in server.ledger.replies(1))
