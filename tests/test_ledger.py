"""The SQLite ledger: hash chain, one transaction per round, clear errors, tampering detected."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest

from seedtune.shared.protocol.aggregation import ACCEPTED, RoundRule
from seedtune.shared.protocol.ledger import Anchor, Ledger, LedgerError, Provenance
from seedtune.shared.protocol.chain import ChainError, unpack_tail
from seedtune.shared.protocol.proto import LedgerHeader

RULE = RoundRule("mean", lr=0.01)
NODES = 3


def header() -> LedgerHeader:
    return LedgerHeader(base_model_digest="b" * 64, trainable_digest="t" * 64, config_json="{}", direction="rademacher",
                        noise="gaussian")


def round_of(k: int, rnd: int) -> tuple[list[int], list[Provenance]]:
    """K seeds (some above 2^63) and three nodes' float32 scalars, plus one rejected reply."""
    rng = np.random.default_rng(rnd)
    seeds = [int(rng.integers(0, 2**63)) * 2 + 1 for _ in range(k)]
    replies = [Provenance(2**64 - 1 - n, f"holder-{n}", ACCEPTED, rng.normal(size=k).astype("<f4").tobytes())
               for n in range(NODES)]
    return seeds, replies + [Provenance(7, "holder-7", "out_of_range")]


def commit(led: Ledger, rnd: int, seeds, replies, rule: RoundRule = RULE, metrics=None):
    """Commit a round the way the server does: the coefficients are the rule over the accepted scalars."""
    accepted = [p.values() for p in replies if p.status == ACCEPTED]
    coeffs = rule.coefficients(np.stack(accepted)) if accepted and seeds else []
    return led.commit_round(rnd, seeds, coeffs, replies, rule, metrics)


HOLDERS = [f"holder-{n}" for n in range(NODES)] + ["holder-7"]


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    led = Ledger.create(tmp_path / "ledger.sqlite", header())
    for rnd in (1, 2, 3):
        led.record_instructions(rnd, HOLDERS, 4)  # as the server does before it sends
        commit(led, rnd, *round_of(4, rnd), metrics={"round": rnd})
    return led


def test_one_entry_per_seed_whose_coefficient_is_the_rounds_aggregate(ledger):
    assert len(ledger) == 12 and ledger.last_round == 3 and ledger.verify() == 12
    entries = list(ledger.entries())
    seeds, replies = round_of(4, 2)
    scalars = np.stack([p.values() for p in replies[:NODES]]).astype(np.float64)
    for k, e in enumerate(entries[4:8]):
        assert (e.seed, e.round) == (seeds[k], 2)
        assert e.coeff == float(np.float32(-0.01 * scalars[:, k].mean()))
    assert [r["entries"] for r in ledger.rounds()] == [4, 4, 4]
    assert [r["rule"] for r in ledger.rounds()] == ["mean"] * 3
    assert ledger.replies(2) == replies  # provenance: every reply, accepted or not, with its scalars


def test_a_round_without_accepted_replies_has_no_entries(ledger):
    seeds, replies = round_of(4, 4)
    assert commit(ledger, 4, seeds, [replies[-1]]) == []
    assert len(ledger) == 12 and ledger.last_round == 4 and ledger.verify() == 12


def test_reopen_and_tail_catch_up(ledger, tmp_path):
    ledger.close()
    again = Ledger.open(tmp_path / "ledger.sqlite")
    tail = again.tail(5)
    got = list(unpack_tail(tail))
    assert [e.index for e in got] == list(range(5, 12))
    assert tail.prev_hash == again.hash_at(5) and tail.head_hash == again.hash_at(12)
    tail.coeffs[2] += 1.0
    with pytest.raises(ChainError, match="does not hash"):
        list(unpack_tail(tail))


def test_a_round_is_committed_once_and_in_order(ledger):
    with pytest.raises(LedgerError, match="round 3 cannot follow round 3"):
        commit(ledger, 3, *round_of(2, 9))
    with pytest.raises(LedgerError, match="round 5 cannot follow round 3"):
        commit(ledger, 5, *round_of(2, 9))
    assert len(ledger) == 12


def test_coefficients_that_do_not_follow_from_the_accepted_replies_are_refused_unwritten(ledger):
    seeds, replies = round_of(4, 4)
    good = RULE.coefficients(np.stack([p.values() for p in replies if p.status == ACCEPTED]))
    for bad in (good * np.float32(2), good[:3], []):
        with pytest.raises(LedgerError, match="do not follow from the accepted replies"):
            ledger.commit_round(4, seeds, bad, replies, RULE)
    assert len(ledger) == 12 and ledger.last_round == 3 and ledger.verify() == 12


def test_accepted_replies_must_carry_one_scalar_per_seed(ledger):
    seeds, replies = round_of(4, 4)
    with pytest.raises(LedgerError, match=r"carry \[3, 4\] scalars for 4 seeds"):
        ledger.commit_round(4, seeds, [0.0] * 4, replies + [Provenance(9, "h", ACCEPTED, np.zeros(3, "<f4").tobytes())],
                            RULE)
    assert len(ledger) == 12 and ledger.last_round == 3


@pytest.mark.parametrize("bad", [np.float32("nan"), np.float32("inf"), np.float32(3e38)])
def test_non_finite_coefficients_never_reach_the_ledger(ledger, bad):
    seeds, replies = round_of(2, 4)
    values = np.array([0.5, bad], dtype="<f4")
    with pytest.raises((LedgerError, ValueError), match="refusing entry 1|must be finite"):
        commit(ledger, 4, seeds, [Provenance(1, "h", ACCEPTED, values.tobytes())], RoundRule("mean", lr=10.0))
    assert len(ledger) == 12 and ledger.last_round == 3 and ledger.verify() == 12


@pytest.mark.parametrize("sql, message", [
    ("UPDATE entries SET coeff = coeff + 1e-3 WHERE idx = 6", "entry 6 .* does not match its chain hash"),
    ("UPDATE entries SET seed = seed + 1 WHERE idx = 0", "entry 0 .* does not match"),
    ("DELETE FROM entries WHERE idx = 11", "round 3 .* does not line up"),
    ("DELETE FROM entries WHERE idx = 4", "entry index 4 is missing"),
    # the provenance is verified too: every coefficient must follow from the accepted replies it keeps
    ("UPDATE replies SET scalars = zeroblob(16) WHERE round = 2 AND holder = 'holder-1'", "round 2 do not follow"),
    ("UPDATE replies SET status = 'out_of_range' WHERE round = 3 AND holder = 'holder-0'", "round 3 do not follow"),
    ("UPDATE replies SET status = 'accepted' WHERE round = 1 AND holder = 'holder-7'", "round 1 has 4 entries"),
    ("DELETE FROM replies WHERE round = 2 AND holder = 'holder-2'", "round 2 do not follow"),
    ("UPDATE rounds SET lr = 0.02 WHERE round = 1", "round 1 do not follow"),
    # the round chain (format 5): everything else a round leaves is hashed into its record
    ("DELETE FROM instructions", "round 1 does not match its record hash"),
    ("UPDATE instructions SET steps = 1 WHERE round = 2 AND holder = 'holder-0'", "round 2 does not match its record"),
    ("DELETE FROM instructions WHERE round = 3 AND holder = 'holder-7'", "round 3 does not match its record"),
    ("INSERT INTO instructions VALUES (2, 'holder-9', 4, 'x')", "round 2 does not match its record"),
    ("DELETE FROM replies WHERE round = 2 AND holder = 'holder-7'", "round 2 does not match its record"),
    ("UPDATE replies SET status = 'malformed' WHERE round = 1 AND holder = 'holder-7'", "round 1 does not match"),
    ("UPDATE rounds SET metrics = '{}' WHERE round = 3", "round 3 does not match its record"),
    ("UPDATE rounds SET committed_utc = '2020-01-01T00:00:00Z' WHERE round = 1", "round 1 does not match"),
    ("DELETE FROM records WHERE round = 2", "round 2 does not match its record"),
    ("UPDATE records SET hash = zeroblob(32) WHERE round = 3", "round 3 does not match its record"),
    # round numbers run 1..N: renumbering a round (with its provenance and record) is refused
    ("UPDATE rounds SET round = 9 WHERE round = 3; UPDATE replies SET round = 9 WHERE round = 3; "
     "UPDATE instructions SET round = 9 WHERE round = 3; UPDATE records SET round = 9 WHERE round = 3",
     "round 9 follows round 2"),
    ("UPDATE rounds SET round = round + 10; UPDATE replies SET round = round + 10", "round 11 follows round 0"),
    ("INSERT INTO instructions VALUES (7, 'holder-0', 4, 'x')", "instructions recorded for rounds 7..7"),
    ("INSERT INTO records VALUES (4, zeroblob(32))", r"records of rounds \[4\] without a rounds row"),
])
def test_tampering_is_detected_and_named(ledger, tmp_path, sql, message):
    ledger.close()
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.executescript(sql)
    conn.commit()
    conn.close()
    with pytest.raises(ChainError, match=message):
        Ledger.open(tmp_path / "ledger.sqlite").verify()


def test_wrong_format_version_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger.create(path, header()).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'header'",
                 (LedgerHeader(format_version=99).SerializeToString(),))
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="format version 99"):
        Ledger.open(path)
    for direction, readable in (("rademacher", True), ("gaussian", False)):
        old = header()
        old.format_version, old.direction = 3, direction
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'header'", (old.SerializeToString(),))
        conn.commit()
        conn.close()
        if readable:  # the Rademacher stream has not changed since format 3: its ledgers replay as before
            Ledger.open(path).close()
        else:
            with pytest.raises(LedgerError, match="format 3.*'gaussian' directions, whose stream changed"):
                Ledger.open(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="not a seedtune ledger"):
        Ledger.open(junk)
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger.open(tmp_path / "missing.sqlite")


def test_resuming_with_another_configuration_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger.create(path, header()).close()
    with pytest.raises(LedgerError, match="different trainable_digest"):
        Ledger.open_or_create(path, header, trainable_digest="x" * 64)
    assert Ledger.open_or_create(path, header, trainable_digest="t" * 64).header.trainable_digest == "t" * 64
    with pytest.raises(LedgerError, match="header has trainable_digest"):  # a new header must pin the same
        Ledger.open_or_create(tmp_path / "new.sqlite", header, trainable_digest="x" * 64)
    assert not (tmp_path / "new.sqlite").exists()


def test_negative_zero_survives_sqlite(ledger):
    """SQLite stores an integral REAL as an integer and drops the sign of -0.0; the chain must not care."""
    zero = np.array([0.0], dtype="<f4").tobytes()  # -lr * 0.0 is -0.0
    (entry,) = commit(ledger, 4, [1], [Provenance(1, "h", ACCEPTED, zero)])
    assert ledger.verify() == 13 and next(ledger.entries(12)).coeff == entry.coeff == 0.0


def test_creation_is_atomic_and_a_crashed_creation_is_cleaned_up(tmp_path):
    path = tmp_path / "ledger.sqlite"
    (tmp_path / "ledger.sqlite.creating").write_bytes(b"half-written by a crashed server")
    ledger = Ledger.create(path, header())
    assert ledger.verify() == 0 and not (tmp_path / "ledger.sqlite.creating").exists()
    assert Ledger.open(path).header.trainable_digest == "t" * 64


def test_seedtune_verify_reports_ok_or_names_the_tampered_entry(ledger, tmp_path, capsys):
    from seedtune.cli import main

    ledger.close()
    assert main(["verify", "--unanchored", str(tmp_path / "ledger.sqlite")]) == 0
    assert '"ok": true' in capsys.readouterr().out
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.execute("UPDATE entries SET seed = seed + 2 WHERE idx = 5")
    conn.commit()
    conn.close()
    assert main(["verify", "--unanchored", str(tmp_path / "ledger.sqlite")]) == 2
    assert "entry 5 (round 2) does not match its chain hash" in capsys.readouterr().err


def test_seedtune_verify_never_writes_to_the_file_it_checks(ledger, tmp_path, capsys):
    """Issue 32, finding 11: verify grew a 0-byte file to 4 KB and switched a plain SQLite file to WAL."""
    from seedtune.cli import main

    empty = tmp_path / "empty.sqlite"
    empty.touch()
    plain = tmp_path / "plain.sqlite"
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = {p: p.read_bytes() for p in (empty, plain)}
    for path in (empty, plain):
        assert main(["verify", str(path)]) == 2 and "not a seedtune ledger" in capsys.readouterr().err
    ledger.close()
    good = tmp_path / "ledger.sqlite"
    kept = good.read_bytes()
    assert main(["verify", "--unanchored", str(good)]) == 0
    assert {p: p.read_bytes() for p in (empty, plain)} == before and good.read_bytes() == kept
    # (a WAL ledger's readers share its -shm index: SQLite's own sidecars, not a change to the ledger)
    assert not any(p.name.startswith(("empty", "plain")) and p not in before for p in tmp_path.iterdir())


def test_the_pending_rounds_instructions_are_allowed_and_counted(ledger):
    ledger.record_instructions(4, ["holder-0"], 4)  # sent, not committed (a crash, or still running)
    assert ledger.verify() == 12 and ledger.instructed_steps()["holder-0"] == 16


def _drop_last_round(path) -> None:
    """A consistent truncation: the last round's entries, rows, provenance, instructions and record."""
    conn = sqlite3.connect(path)
    conn.executescript("DELETE FROM entries WHERE round = 3; DELETE FROM rounds WHERE round = 3; "
                       "DELETE FROM replies WHERE round = 3; DELETE FROM instructions WHERE round = 3; "
                       "DELETE FROM records WHERE round = 3")
    conn.close()


def test_a_ledger_behind_or_beside_its_anchor_is_refused(ledger):
    anchor = Anchor(3, ledger.record_at(3).hex(), "metrics.jsonl")
    assert ledger.verify(anchor) == 12 and ledger.verify(Anchor(2, ledger.record_at(2).hex())) == 12
    with pytest.raises(ChainError, match="round 2 differs from its anchor"):  # another history to round 2
        ledger.verify(Anchor(2, "00" * 32, "metrics.jsonl"))
    path = ledger.path
    ledger.close()
    _drop_last_round(path)
    dropped = Ledger.open(path)
    assert dropped.verify() == 8  # consistent in itself: only something outside the file can tell
    with pytest.raises(ChainError, match=r"ends at round 2, but its anchor \(metrics.jsonl\) records round 3"):
        dropped.verify(anchor)


def test_a_lost_wal_is_caught_by_the_anchor(tmp_path):
    """A copy of the main file without its WAL is the ledger as of the last checkpoint: rounds are missing."""
    import shutil

    led = Ledger.create(tmp_path / "ledger.sqlite", header())
    for rnd in (1, 2, 3):
        commit(led, rnd, *round_of(4, rnd))
    anchor = Anchor(3, led.record_at(3).hex(), "metrics.jsonl")
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "ledger.sqlite", tmp_path / "copy" / "ledger.sqlite")  # the WAL stays behind
    led.close()
    lost = Ledger.open(tmp_path / "copy" / "ledger.sqlite")
    assert lost.last_round < 3 and lost.verify() == 4 * lost.last_round
    with pytest.raises(ChainError, match=f"ends at round {lost.last_round}, but its anchor"):
        lost.verify(anchor)


def _write_rounds(path: str, stop, started, rounds: int) -> None:
    """A server in another process committing rounds back to back (a thread would share the GIL with the
    verifier and barely run)."""
    led = Ledger.open(path)
    for rnd in range(1, rounds + 1):
        if stop.is_set():
            break
        led.record_instructions(rnd, HOLDERS, 2)
        commit(led, rnd, *round_of(2, rnd % 50))
        started.set()
        time.sleep(0.003)
    led.close()


def test_verify_during_writes_raises_no_false_alarm(tmp_path):
    """Verify reads in one transaction: a writer committing meanwhile is never seen half-way (the old
    verify read entries and rounds in two snapshots: 25 false alarms in 300 checks on this machine)."""
    import multiprocessing

    path = tmp_path / "ledger.sqlite"
    Ledger.create(path, header()).close()
    ctx = multiprocessing.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_write_rounds, args=(str(path), stop, started, 200))
    writer.start()
    assert started.wait(120), "the writer process did not start"
    reader = Ledger.open(path)
    errors, during = [], 0
    deadline = time.monotonic() + 240
    try:
        # check for as long as the writer writes (its 200 rounds), however busy the machine: a fixed count of
        # checks overlapped only 33 rounds on a loaded CI runner
        while writer.is_alive() and time.monotonic() < deadline:
            try:
                reader.verify()
            except ChainError as exc:
                errors.append(str(exc))
            during += 1
    finally:
        stop.set()
        writer.join(60)
    rounds = reader.last_round
    reader.close()
    assert rounds == 200 and during > 100, f"only {during} checks overlapped {rounds} rounds of writing"
    assert errors == [], f"{len(errors)} false alarms in {during} checks, e.g. {errors[0]}"


def test_an_older_format_is_read_but_not_continued(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger.create(path, header()).close()
    old = header()
    old.format_version = 4
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'header'", (old.SerializeToString(),))
    conn.commit()
    conn.close()
    assert Ledger.open(path).verify() == 0
    with pytest.raises(LedgerError, match="format 4, written by an older seedtune.*new run folder"):
        Ledger.open_or_create(path, header)


def test_seedtune_verify_checks_the_run_folders_anchor(ledger, tmp_path, capsys):
    from seedtune.cli import main

    rows = [{"round": r, "ledger_record": ledger.record_at(r).hex()} for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ledger.close()
    assert main(["verify", str(tmp_path / "ledger.sqlite")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["anchored_round"] == 3 and out["record"] == rows[2]["ledger_record"] and out["format"] == 5
    _drop_last_round(tmp_path / "ledger.sqlite")
    assert main(["verify", str(tmp_path / "ledger.sqlite")]) == 2
    assert "ends at round 2, but its anchor" in capsys.readouterr().err


def test_a_ledger_whose_anchor_was_deleted_is_refused_unless_the_user_says_so(ledger, tmp_path, capsys):
    """Issue 32, finding 8: deleting metrics.jsonl removed the anchor silently (verify ok, anchored_round null),
    so a ledger cut back by rounds passed as whole."""
    from seedtune.cli import main

    ledger.close()
    _drop_last_round(tmp_path / "ledger.sqlite")  # a rolled-back ledger, and no metrics.jsonl to show it
    assert main(["verify", str(tmp_path / "ledger.sqlite")]) == 2
    assert "2 rounds and no anchor (its run folder's metrics.jsonl" in capsys.readouterr().err
    assert main(["verify", "--unanchored", str(tmp_path / "ledger.sqlite")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unanchored"] is True and out["anchored_round"] is None and out["rounds"] == 2
