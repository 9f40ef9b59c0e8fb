"""The SQLite ledger: hash chain, one transaction per round, clear errors, tampering detected."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from shared.ledger import Ledger, LedgerError
from shared.chain import ChainError, unpack_tail
from shared.proto import LedgerHeader


def header() -> LedgerHeader:
    return LedgerHeader(base_model_digest="b" * 64, trainable_digest="t" * 64, config_json="{}", direction="rademacher",
                        noise="gaussian", noise_multiplier=0.5)


def updates(n: int, rnd: int) -> list[tuple[int, float, int]]:
    rng = np.random.default_rng(rnd)
    return [(int(rng.integers(0, 2**63)) * 2 + 1, float(rng.normal()), 2**64 - 1 - k) for k in range(n)]


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    led = Ledger.create(tmp_path / "ledger.sqlite", header())
    for rnd in (1, 2, 3):
        led.commit_round(rnd, updates(4, rnd), {"round": rnd})
    return led


def test_entries_round_trip_as_float32_and_uint64(ledger):
    assert len(ledger) == 12 and ledger.last_round == 3 and ledger.verify() == 12
    entries = list(ledger.entries())
    ups = updates(4, 2)
    for e, (seed, coeff, node) in zip(entries[4:8], ups):
        assert (e.seed, e.node, e.round) == (seed, node, 2)
        assert e.coeff == float(np.float32(coeff))
    assert [r["entries"] for r in ledger.rounds()] == [4, 4, 4]


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
    with pytest.raises(LedgerError, match="round 3 is already committed"):
        ledger.commit_round(3, updates(2, 9))
    assert len(ledger) == 12


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39])
def test_non_finite_coefficients_never_reach_the_ledger(ledger, bad):
    with pytest.raises(LedgerError, match="refusing update 1"):
        ledger.commit_round(4, [(1, 0.5, 1), (2, bad, 1)])
    assert len(ledger) == 12 and ledger.last_round == 3 and ledger.verify() == 12


@pytest.mark.parametrize("sql, message", [
    ("UPDATE entries SET coeff = coeff + 1e-3 WHERE idx = 6", "entry 6 .* does not match its chain hash"),
    ("UPDATE entries SET seed = seed + 1 WHERE idx = 0", "entry 0 .* does not match"),
    ("DELETE FROM entries WHERE idx = 11", "round 3 .* does not line up"),
    ("DELETE FROM entries WHERE idx = 4", "entry index 4 is missing"),
])
def test_tampering_is_detected_and_named(ledger, tmp_path, sql, message):
    ledger.close()
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.execute(sql)
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
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="not a seedtune ledger"):
        Ledger.open(junk)
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger.open(tmp_path / "missing.sqlite")


def test_resuming_with_another_configuration_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger.create(path, header()).close()
    other = header()
    other.trainable_digest = "x" * 64
    with pytest.raises(LedgerError, match="different trainable_digest"):
        Ledger.open_or_create(path, other)
    assert Ledger.open_or_create(path, header()).header.trainable_digest == "t" * 64


def test_negative_zero_survives_sqlite(ledger):
    """SQLite stores an integral REAL as an integer and drops the sign of -0.0; the chain must not care."""
    (entry,) = ledger.commit_round(4, [(1, -0.0, 1)])
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
    assert main(["verify", str(tmp_path / "ledger.sqlite")]) == 0
    assert '"ok": true' in capsys.readouterr().out
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.execute("UPDATE entries SET seed = seed + 2 WHERE idx = 5")
    conn.commit()
    conn.close()
    assert main(["verify", str(tmp_path / "ledger.sqlite")]) == 2
    assert "entry 5 (round 2) does not match its chain hash" in capsys.readouterr().err
