"""What a node releases and keeps of its privacy: one test per finding of the privacy review (issue 16).

Each test is named after the finding it guards and fails on the code before the fix."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message

import seedtune.client.app as client_app
from seedtune.client.privacy_ledger import open_privacy_ledger
from seedtune.client.zo_step import privatize, zo_step
from seedtune.server.federation import FederatedServer, FederationHalted
from seedtune.shared.protocol.chain import ChainError
from seedtune.shared.privacy.accounting import StepRun, noise_epsilon, noise_pld, step_pld
from seedtune.shared.privacy.noise import GAUSSIAN_SUPPORT, LaplaceMixture, Noise, SecureRandom, Skellam
from seedtune.shared.protocol.proto import Instruction, Reply
from seedtune.shared.task.tasks import Split
from seedtune.shared.protocol.wire import from_content, to_content
from seedtune.simulations.inprocess import InProcessGrid
from tests.test_federation import NODES, STEPS, fed_config

PUBLIC_REPLY_FIELDS = {"protocol_version", "run_id", "round", "node", "model_version", "scalars", "metrics",
                       "runtime", "holder"}


def _train_round(tmp_path, **extra):
    """A server after one round, its grid, and every train message with the node's reply."""
    grid = InProcessGrid(NODES)
    exchanged = []
    send = grid.send_and_receive

    def recording(messages, timeout=None):
        messages = list(messages)
        replies = send(messages, timeout=timeout)
        exchanged.extend((m, r) for m, r in zip(messages, replies) if m.metadata.message_type == "train")
        return replies

    grid.send_and_receive = recording
    server = FederatedServer(fed_config(tmp_path, **{"federation.rounds": 1, **extra}), grid, tmp_path)
    row = server.run_round(1)
    return server, grid, exchanged, row


def test_the_reply_of_a_private_node_carries_no_loss_batch_size_or_data_size(tmp_path):
    server, _, exchanged, row = _train_round(tmp_path)
    assert len(exchanged) == NODES and row["accepted"] == NODES
    for _, msg in exchanged:
        reply = from_content(msg.content, Reply)
        assert {f.name for f, _ in reply.ListFields()} <= PUBLIC_REPLY_FIELDS
        assert set(reply.metrics) == {"epsilon"} and len(reply.scalars) == 4 * STEPS
    assert "train_loss" not in row and all("loss" not in k for k in row)


def _instruction(server, grid) -> tuple[Message, Instruction]:
    msg = next(m for m in grid.sent if m.metadata.message_type == "train")
    return msg, from_content(msg.content, Instruction)


def _answer(grid, msg: Message, ins: Instruction, node_config: dict | None = None) -> Reply:
    context = grid.contexts[msg.metadata.dst_node_id]
    if node_config is not None:
        context = SimpleNamespace(**{**vars(context), "node_config": node_config})
    reply = client_app.train(Message(to_content(ins), dst_node_id=msg.metadata.dst_node_id, message_type="train",
                                     group_id=msg.metadata.group_id), context)
    return from_content(reply.content, Reply)


@pytest.mark.parametrize("change, refusal", [
    (lambda h: setattr(h, "private", False), "non-private instruction"),
    (lambda h: setattr(h, "noise", Noise.gaussian(0.3).to_json()), "differs from the ledger header"),
    (lambda h: setattr(h, "clip", h.clip * 10), "differ from the ledger header"),
    (lambda h: setattr(h, "sample_rate", 1.0), "differ from the ledger header"),
])
def test_a_non_private_or_weakened_instruction_to_a_private_node_is_refused_by_name(tmp_path, change, refusal):
    server, grid, _, _ = _train_round(tmp_path)
    msg, ins = _instruction(server, grid)
    ins.round = 2  # not the answered instruction: a new one, weakened
    change(ins.hyper)
    reply = _answer(grid, msg, ins)
    assert refusal in reply.refusal and not reply.scalars


@pytest.mark.parametrize("forged", [Skellam(1e6, 100), Noise.laplace(0.5)], ids=["skellam", "laplace"])
def test_a_node_refuses_a_header_noise_its_federation_does_not_release(tmp_path, monkeypatch, forged):
    """A plain federation configured with the Gaussian: a header pinning Skellam noise (a lattice added to a real
    sum, whose privacy loss is unbounded, yet accounted as finite) or another family than the configured one is
    refused by every node, before anything is released."""
    import seedtune.server.federation as federation

    monkeypatch.setattr(federation, "plan_noise", lambda *args, **kwargs: forged)
    server, _, exchanged, row = _train_round(tmp_path)
    assert row["accepted"] == 0 and len(exchanged) == NODES
    for _, msg in exchanged:
        reply = from_content(msg.content, Reply)
        assert "is not what this federation releases" in reply.refusal and not reply.scalars


def test_a_head_frame_node_refuses_seeds_that_are_not_whole_steps(tmp_path):
    """With K directions per step (a full Hadamard frame over the tiny encoder's head: K = 128) an instruction's
    seeds are whole steps; a node given part of a step refuses by name rather than account a fraction of one."""
    frame = {"selection.mode": "head", "zo.direction": "hadamard", "zo.directions": 0, "zo.lr": 0.5}
    server, grid, _, row = _train_round(tmp_path, **frame)
    assert row["accepted"] == NODES
    msg, ins = _instruction(server, grid)
    assert len(ins.seeds) == 128 * STEPS
    ins.round = 2
    del ins.seeds[-1]
    reply = _answer(grid, msg, ins)
    assert "are not whole steps of the header's 128 directions" in reply.refusal and not reply.scalars


def test_a_deployed_node_without_its_own_budget_refuses_and_never_takes_the_servers(tmp_path):
    server, grid, _, _ = _train_round(tmp_path)
    msg, ins = _instruction(server, grid)
    ins.round = 2
    deployed = {"partition-id": 0, "num-partitions": NODES}  # no "simulated": a real SuperNode
    reply = _answer(grid, msg, ins, deployed)
    assert "no privacy budget of its own" in reply.refusal and not reply.scalars
    half = _answer(grid, msg, ins, {**deployed, "epsilon-budget": 3.0})
    assert "delta" in half.refusal and not half.scalars
    own = _answer(grid, msg, ins, {**deployed, "epsilon-budget": 3.0, "delta": 1e-5})
    assert not own.refusal and len(own.scalars) == 4 * STEPS


def test_a_multi_atom_laplace_is_accounted_by_its_mixture_pld():
    mixture = LaplaceMixture("laplace", rates=(0.5, 1000.0), weights=(0.5, 0.5))
    epsilon = noise_epsilon((StepRun(mixture, 0.08, 20),), 1e-5)
    assert epsilon == pytest.approx(29.8, abs=0.2)  # its first atom alone would say 0.61
    assert step_pld(mixture, 0.08).get_epsilon_for_delta(1e-5) == pytest.approx(
        noise_pld(mixture, 0.08).get_epsilon_for_delta(1e-5), rel=1e-9)


def _one_round_spent(tmp_path):
    """One round of a federation whose nodes have budget 3; the holders' ledger, what each spent, and a node
    config whose budget leaves room for less than one more round."""
    budget = {"epsilon-budget": 3.0, "delta": 1e-5}
    first = FederatedServer(fed_config(tmp_path / "a", **{"federation.rounds": 1}),
                            InProcessGrid(NODES, node_configs={i: budget for i in range(NODES)}), tmp_path / "a")
    assert first.run_round(1)["accepted"] == NODES
    ledger = open_privacy_ledger()
    spent = {k: ledger.epsilon(k, 1e-5) for k in ledger.keys()}
    assert sorted(spent) == [f"partition-{i}-of-{NODES}" for i in range(NODES)]
    assert all(0 < e < 3.0 for e in spent.values())
    two_rounds = noise_epsilon((StepRun(first.noise, first.config.federation.sample_rate, 2 * STEPS),), 1e-5)
    return ledger, spent, {"epsilon-budget": (max(spent.values()) + two_rounds) / 2, "delta": 1e-5}


def test_restarting_a_node_and_a_second_federation_continue_its_spending_from_disk_and_refuse_past_it(tmp_path):
    # New processes' worth of state (fresh contexts, new node ids), a new federation over the same data and
    # a budget that leaves room for less than one more round: every node refuses, by its ledger on disk.
    ledger, spent, tight = _one_round_spent(tmp_path)
    second = FederatedServer(fed_config(tmp_path / "b", **{"federation.rounds": 1}),
                             InProcessGrid(NODES, node_configs={i: tight for i in range(NODES)}, first_id=77),
                             tmp_path / "b")
    row = second.run_round(1)
    assert row["accepted"] == 0 and row["rejected_by_kind"] == {"refused": NODES}
    assert {k: ledger.epsilon(k, 1e-5) for k in ledger.keys()} == spent  # refused: nothing more was spent
    assert all(ledger.steps(k) == STEPS for k in ledger.keys())


def test_a_resumed_simulation_whose_node_ids_changed_still_accounts_every_partitions_spending(tmp_path):
    config = fed_config(tmp_path, **{"federation.rounds": 3})
    first = FederatedServer(config, InProcessGrid(NODES), tmp_path)
    first.run_round(1)
    first.run_round(2)
    first.ledger.close()
    resumed = FederatedServer(config, InProcessGrid(NODES, first_id=5), tmp_path)  # relaunched: new node ids
    row = resumed.run_round(3)
    three_rounds = noise_epsilon((StepRun(resumed.noise, config.federation.sample_rate, 3 * STEPS),),
                                 config.privacy.delta)
    assert row["epsilon"] == {f"partition-{i}-of-{NODES}": pytest.approx(three_rounds, rel=1e-12)
                              for i in range(NODES)}
    ledger = open_privacy_ledger()  # and the holders' own ledgers say the same
    assert sorted(ledger.epsilon(k, config.privacy.delta) for k in ledger.keys()) == pytest.approx(
        [three_rounds] * NODES, rel=1e-12)


def test_a_redelivered_instruction_gets_the_same_bytes_back(tmp_path):
    server, grid, exchanged, _ = _train_round(tmp_path)
    msg, first = exchanged[0]
    again = client_app.train(msg, grid.contexts[msg.metadata.dst_node_id])
    assert again.content.config_records["seedtune"]["payload"] == first.content.config_records["seedtune"]["payload"]
    ledger = open_privacy_ledger()
    assert sorted(ledger.steps(k) for k in ledger.keys()) == [STEPS] * NODES  # one release, not two


class _Overflowing:
    """A model whose loss overflows for one example along any direction (a ZoModel of four examples)."""

    def snapshot(self) -> None:
        self.scale = 0.0

    def perturb(self, seed: int, scale: float) -> None:
        self.scale = scale

    def restore(self) -> None:
        self.scale = 0.0

    def apply(self, seed: int, coeff: float) -> None:
        pass

    def per_example_loss(self, ids, labels) -> np.ndarray:
        base = np.array([0.5 + 0.1 * self.scale * i for i in range(len(ids))], dtype=np.float32)
        base[np.asarray(labels) == 9] = np.inf if self.scale > 0 else 1.0
        return base


def test_an_infinite_estimate_releases_a_finite_scalar():
    rng = SecureRandom()
    g = np.array([0.5, np.inf, -np.inf, np.nan, -0.25])
    scalar, clipped = privatize(g, 1.0, 4.0, Noise.gaussian(1.0), rng)
    assert math.isfinite(scalar) and clipped == 0
    assert privatize(g, 1.0, 4.0, None, rng)[0] == pytest.approx((0.5 - 0.25) / 4.0)
    result = zo_step(_Overflowing(), [[1], [2], [3], [4]], np.array([0, 9, 1, 0]), seeds=(5,), mu=1e-3,
                     sample_rate=1.0, microbatch=2, rng=rng, clip=1.0, noise=Noise.gaussian(1.0))
    assert all(math.isfinite(s) for s in result.scalars) and result.nonfinite == 1


def test_the_train_subset_changes_by_one_record_when_one_record_is_removed():
    sentences = [(f"record number {i}",) for i in range(4000)]
    split = Split(sentences, np.arange(4000) % 2)
    kept = set(split.hashed_subset(1000, seed=3).records)
    assert 850 < len(kept) < 1150
    removed = sentences[17]
    # The neighbouring file, one record short; the public size is that of the original (its rate unchanged).
    neighbour = Split(sentences[:17] + sentences[18:], np.delete(np.arange(4000) % 2, 17))
    kept_without = set(neighbour.hashed_subset(1000 * 3999 / 4000, seed=3).records)
    assert kept - {removed} == kept_without


def test_the_gaussian_sampler_reaches_far_beyond_8_65_sigma_and_its_gap_is_negligible(monkeypatch):
    # Force the rare event: a first uniform whose leading 120 bits are zero (probability 2^-120).
    words = iter([b"\xff" * 8, b"\x00" * 8, b"\x00" * 8, b"\xff\xff\xff\xff\xff\xff\xff\x7f"])
    monkeypatch.setattr(SecureRandom, "_bytes", lambda self, n: next(words))
    u = SecureRandom().uniform(1)
    assert 0 < u[0] < 2.0**-100  # a 53-bit uniform stops at 2^-54, so Box-Muller at 8.65 sigma
    assert math.sqrt(-2 * math.log(u[0])) > 11.0
    assert GAUSSIAN_SUPPORT > 37 and Noise.gaussian(1.0).support_gap() < 1e-300
    assert Noise.laplace(1.0).support_gap() < 1e-300


def test_a_restarted_node_refuses_a_server_whose_run_folder_was_rolled_back(tmp_path, caplog):
    """The whole run folder restored from a backup taken after round 1 (ledger and metrics consistent with
    each other, so the server itself cannot tell): nodes that restarted with nothing but their disks still
    refuse it, by the position they last followed (issue 20), and nothing more is committed or released."""
    import shutil

    config = fed_config(tmp_path / "run", **{"federation.rounds": 3})
    server = FederatedServer(config, InProcessGrid(NODES), tmp_path / "run")
    server.run_round(1)
    server.ledger.close()
    shutil.copytree(tmp_path / "run", tmp_path / "backup")
    shutil.copytree(tmp_path / "anchors", tmp_path / "anchors-backup")  # the server's machine, whole
    server = FederatedServer(config, InProcessGrid(NODES), tmp_path / "run")
    server.run_round(2)
    assert len(server.sync()[1]) == NODES  # the nodes follow round 2's entries (the end-of-run sync)
    server.ledger.close()
    ledger = open_privacy_ledger()
    released = {k: ledger.steps(k) for k in ledger.keys()}
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(tmp_path / "backup", tmp_path / "run")
    # the run folder alone restored: the server's anchor outside it (shared.protocol.run_folder.home_anchor) refuses it
    with pytest.raises(ChainError, match=r"ends at round 1, but its anchor \(.*anchors.*\) records round 2"):
        FederatedServer(config, InProcessGrid(NODES, first_id=20), tmp_path / "run")
    shutil.rmtree(tmp_path / "anchors")
    shutil.copytree(tmp_path / "anchors-backup", tmp_path / "anchors")  # and its anchors too: only nodes can tell
    restored = FederatedServer(config, InProcessGrid(NODES, first_id=40), tmp_path / "run")  # new node processes
    assert restored.ledger.last_round == 1
    # the nodes identify (nothing of the ledger yet), then refuse its tail: the server stops by name (issue 32,
    # finding 8), committing no empty round and writing no summary
    with pytest.raises(FederationHalted, match=f"every node that answered .{NODES}. refused this server's ledger"):
        restored.run()
    assert caplog.text.count("its ledger went backwards") >= NODES
    assert restored.ledger.last_round == 1 and not (tmp_path / "run" / "summary.json").exists()
    assert {k: ledger.steps(k) for k in ledger.keys()} == released


def test_a_node_refuses_a_tail_that_forks_from_the_history_it_followed(tmp_path):
    from seedtune.client.node import Refusal, _check_anchor
    from seedtune.shared.protocol.chain import Entry, chain, genesis, pack_tail
    from seedtune.shared.protocol.proto import LedgerHeader

    start = genesis(LedgerHeader(config_json="{}"))
    ours = [Entry(i, 100 + i, 0.5, 1 + i // 2) for i in range(4)]
    theirs = ours[:2] + [Entry(i, 900 + i, 0.5, 2) for i in (2, 3)] + [Entry(4, 7, 0.1, 3)]
    tail = pack_tail(theirs, start, chain(start, theirs), 0)
    ins = Instruction(header_digest="ab" * 32, tail=tail)
    replica = SimpleNamespace(version=5, head=tail.head_hash)
    with pytest.raises(Refusal, match="differs, up to version 4, from the history this node followed"):
        _check_anchor((4, chain(start, ours)), ins, (0, start), replica)
    _check_anchor((2, chain(start, ours[:2])), ins, (0, start), replica)  # the shared prefix is fine
    with pytest.raises(Refusal, match="to version 6, but the server's is at version 5: its ledger went backwards"):
        _check_anchor((6, b"x"), ins, (0, start), replica)


def test_a_node_with_a_bad_data_file_refuses_without_quoting_its_records(tmp_path, caplog):
    from tests.test_federation import _data_folder

    data = _data_folder(tmp_path / "data", "train", "sentence\tlabel\nfine\t1\nmy secret diagnosis\tX\n")
    server = FederatedServer(fed_config(tmp_path / "run", **{"data.data_dir": str(data)}), InProcessGrid(NODES),
                             tmp_path / "run")
    row = server.run_round(1)
    assert row["rejected_by_kind"] == {"refused": NODES} and row["entries"] == 0
    to_server = [r.getMessage() for r in caplog.records if r.name.startswith("seedtune.server.")]
    assert sum("data file is unusable" in m for m in to_server) == NODES
    assert not any("secret" in m or "'X'" in m for m in to_server)  # what the server saw and logged
    assert any("record 2 has label 'X'" in r.getMessage() for r in caplog.records if r.name == "seedtune.client.node")


def test_a_server_that_selects_other_records_of_a_holder_charges_the_same_budget(tmp_path):
    """Issue 32, finding 1: the budget was keyed by the records a server's data settings selected, so a changed
    data.min_words opened a fresh full budget for the same people; now every release is the holder's."""
    ledger, spent, tight = _one_round_spent(tmp_path)
    # another selection of the same holders' records (fewer, other rows): no fresh budget
    second = FederatedServer(fed_config(tmp_path / "b", **{"federation.rounds": 1, "data.min_words": 5}),
                             InProcessGrid(NODES, node_configs={i: tight for i in range(NODES)}, first_id=77),
                             tmp_path / "b")
    assert second.run_round(1)["rejected_by_kind"] == {"refused": NODES}
    assert {k: ledger.epsilon(k, 1e-5) for k in ledger.keys()} == spent
    # a holder that keeps a separate budget for a separate data set says so in its node config
    scoped = {**tight, "budget-scope": "second-study"}
    third = FederatedServer(fed_config(tmp_path / "c", **{"federation.rounds": 1, "data.min_words": 5}),
                            InProcessGrid(NODES, node_configs={i: scoped for i in range(NODES)}, first_id=99),
                            tmp_path / "c")
    assert third.run_round(1)["accepted"] == NODES
    assert sorted(ledger.keys()) == sorted([*spent, *(f"{k}/second-study" for k in spent)])


def test_a_deployed_node_whose_privacy_ledger_is_missing_refuses_and_creates_nothing(tmp_path):
    """Issue 32, finding 5: a deleted privacy ledger silently started a fresh budget."""
    server, grid, _, _ = _train_round(tmp_path / "run")
    msg, ins = _instruction(server, grid)
    ins.round = 2
    gone = tmp_path / "holder" / "privacy-ledger.sqlite"
    deployed = {"partition-id": 0, "num-partitions": NODES, "epsilon-budget": 3.0, "delta": 1e-5,
                "privacy-ledger": str(gone)}
    reply = _answer(grid, msg, ins, deployed)
    assert f"no privacy ledger at {gone}" in reply.refusal and "seedtune holder init" in reply.refusal
    assert not reply.scalars and not gone.exists() and not gone.parent.exists()
    gone.parent.mkdir()
    gone.write_bytes(b"")  # an emptied file is no ledger either, and stays as it was
    assert "holds no privacy ledger" in _answer(grid, msg, ins, deployed).refusal and gone.stat().st_size == 0


def test_holder_init_creates_a_ledger_once_and_status_and_backup_read_it(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "holder.sqlite"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "seedtune", "holder", *args, "--ledger", str(path)],
                              capture_output=True, text=True, timeout=120)

    assert cli("status").returncode == 2 and not path.exists()
    assert json.loads(cli("init").stdout)["created"] and path.is_file()
    again = cli("init")
    assert again.returncode == 2 and "never replaced" in again.stderr and "Traceback" not in again.stderr
    ledger = open_privacy_ledger(path)
    run = (Noise.gaussian(1.0), 0.1, 10)
    ledger.record("h", "request", run, None, b"reply")
    status = json.loads(cli("status").stdout)
    assert [(b["budget"], b["steps"]) for b in status["budgets"]] == [("h", 10)]
    assert status["budgets"][0]["epsilon"] == pytest.approx(noise_epsilon((StepRun(*run),), 1e-5), rel=1e-12)
    assert cli("backup", str(tmp_path / "copy.sqlite")).returncode == 0
    assert open_privacy_ledger(tmp_path / "copy.sqlite").steps("h") == 10


def test_a_format_2_privacy_ledger_counts_its_releases_against_every_budget_it_serves(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE releases (data_key TEXT NOT NULL, request TEXT NOT NULL, noise TEXT NOT NULL,
            sample_rate REAL NOT NULL, steps INTEGER NOT NULL, reply BLOB NOT NULL, released_utc TEXT NOT NULL,
            PRIMARY KEY (data_key, request));
        CREATE TABLE followed (holder TEXT NOT NULL, ledger TEXT NOT NULL, version INTEGER NOT NULL,
            head BLOB NOT NULL, followed_utc TEXT NOT NULL, PRIMARY KEY (holder, ledger));""")
    old.execute("INSERT INTO releases VALUES (?, 'r', ?, 0.1, 10, x'00', 'then')", ("ab" * 32, Noise.gaussian(1.0).to_json()))
    old.commit()
    old.close()
    ledger = open_privacy_ledger(path)
    assert ledger.steps("anyone") == ledger.steps("partition-0-of-3") == 10
    assert ledger.epsilon("anyone", 1e-5) > 0


def test_a_privacy_ledger_deleted_under_a_running_node_is_not_written_to_again(tmp_path):
    path = tmp_path / "holder.sqlite"
    first = open_privacy_ledger(path, create=True)
    assert open_privacy_ledger(path) is first
    path.unlink()
    with pytest.raises(ValueError, match=f"no privacy ledger at {path}"):
        open_privacy_ledger(path)
    assert not path.exists()
