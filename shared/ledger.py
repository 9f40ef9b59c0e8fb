"""The ledger: the global model's whole history as hash-chained (seed, coeff, round, node) entries in SQLite.

Durability: WAL journal with ``synchronous=FULL`` and one transaction per round, so a crash at any point
leaves the file at the last committed round, never half a round. A round number can be committed only
once, and only after the previous one, so no entry is ever applied twice. Every entry row keeps its chain
hash; :meth:`Ledger.verify` recomputes the chain from the header and names the first entry that differs.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from shared.chain import ChainError, Entry, genesis, link, pack_tail
from shared.proto import LEDGER_FORMAT_VERSION, LedgerHeader, LedgerTail

_U64 = 1 << 64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, round INTEGER NOT NULL, node INTEGER NOT NULL, seed INTEGER NOT NULL,
    coeff REAL NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS instructions (
    round INTEGER NOT NULL, holder TEXT NOT NULL, steps INTEGER NOT NULL, sent_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, first_idx INTEGER NOT NULL, count INTEGER NOT NULL, head BLOB NOT NULL,
    committed_utc TEXT NOT NULL, metrics TEXT NOT NULL);
"""


class LedgerError(RuntimeError):
    """The ledger file is missing, of another format, for another run, or fails its hash chain."""


def _to_i64(x: int) -> int:  # SQLite integers are signed 64-bit; seeds and node ids are unsigned
    return x - _U64 if x >= 1 << 63 else x


def _to_u64(x: int) -> int:
    return x + _U64 if x < 0 else x


class Ledger:
    def __init__(self, path: Path, conn: sqlite3.Connection, header: LedgerHeader) -> None:
        self.path = path
        self._conn = conn
        self.header = header
        self.genesis = genesis(header)

    # ---------------------------------------------------------------------------------------- opening
    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None)  # explicit BEGIN/COMMIT only
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"ledger {str(path)!r} does not exist")
        try:
            conn = cls._connect(path)
            row = conn.execute("SELECT value FROM meta WHERE key = 'header'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{str(path)!r} is not a seedtune ledger ({exc})") from exc
        if row is None:
            conn.close()
            raise LedgerError(f"{str(path)!r} has no ledger header")
        header = LedgerHeader.FromString(row[0])
        if header.format_version != LEDGER_FORMAT_VERSION:
            conn.close()
            raise LedgerError(f"ledger {str(path)!r} has format version {header.format_version}; this seedtune "
                              f"reads version {LEDGER_FORMAT_VERSION}")
        return cls(path, conn, header)

    @classmethod
    def create(cls, path: str | Path, header: LedgerHeader) -> "Ledger":
        path = Path(path)
        if path.exists():
            raise LedgerError(f"ledger {str(path)!r} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        header.format_version = LEDGER_FORMAT_VERSION
        # Built under a temporary name and renamed into place, so a crash while creating never leaves a
        # file without its header where a restarted server would look for the ledger.
        tmp = path.with_name(path.name + ".creating")
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        conn = cls._connect(tmp)
        conn.executescript(f"BEGIN; {_SCHEMA} COMMIT;")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO meta VALUES ('header', ?)", (header.SerializeToString(deterministic=True),))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()  # the last connection: SQLite folds the WAL into the file and removes it
        os.replace(tmp, path)
        return cls(path, cls._connect(path), header)

    @classmethod
    def open_or_create(cls, path: str | Path, header: LedgerHeader) -> "Ledger":
        """Resume an existing ledger if it pins the same model, trainable set and configuration."""
        if not Path(path).exists():
            return cls.create(path, header)
        ledger = cls.open(path)
        for field in ("base_model_digest", "trainable_digest", "config_json", "direction", "noise", "noise_params"):
            if getattr(ledger.header, field) != getattr(header, field):
                ledger.close()
                raise LedgerError(f"ledger {str(path)!r} was started with a different {field}; use a new run "
                                  f"folder or the original configuration")
        return ledger

    def close(self) -> None:
        self._conn.close()

    # --------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    @property
    def last_round(self) -> int:
        return self._conn.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0]

    def hash_at(self, version: int) -> bytes:
        """Chain hash of the model after ``version`` entries (the genesis hash for 0)."""
        if version == 0:
            return self.genesis
        row = self._conn.execute("SELECT hash FROM entries WHERE idx = ?", (version - 1,)).fetchone()
        if row is None:
            raise LedgerError(f"ledger has {len(self)} entries; no version {version}")
        return row[0]

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        stop = len(self) if stop is None else stop
        for idx, rnd, node, seed, coeff in self._conn.execute(
                "SELECT idx, round, node, seed, coeff FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, stop)):
            yield Entry(idx, _to_u64(seed), coeff, rnd, _to_u64(node))

    def tail(self, start: int) -> LedgerTail:
        """The entries from ``start`` on, packed for a client at version ``start``."""
        end = len(self)
        if not 0 <= start <= end:
            raise LedgerError(f"tail start {start} outside the ledger (0..{end})")
        return pack_tail(list(self.entries(start, end)), self.hash_at(start), self.hash_at(end), start)

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT round, first_idx, count, committed_utc, metrics FROM rounds ORDER BY round")
        return [{"round": r, "first_index": i, "entries": c, "committed_utc": t, "metrics": json.loads(m)}
                for r, i, c, t, m in rows]

    def verify(self) -> int:
        """Recompute the whole chain and the round bookkeeping; returns the number of entries checked."""
        hashes = [self.genesis]  # hashes[v]: chain hash at version v
        for idx, rnd, node, seed, coeff, stored in self._conn.execute(
                "SELECT idx, round, node, seed, coeff, hash FROM entries ORDER BY idx"):
            if idx != len(hashes) - 1:
                raise ChainError(f"ledger {self.path}: entry index {len(hashes) - 1} is missing (found {idx})")
            hashes.append(link(hashes[-1], Entry(idx, _to_u64(seed), coeff, rnd, _to_u64(node))))
            if hashes[-1] != stored:
                raise ChainError(f"ledger {self.path}: entry {idx} (round {rnd}) does not match its chain hash: "
                                 f"the file was modified")
        n = len(hashes) - 1
        covered = 0
        for rnd, first, count, head in self._conn.execute("SELECT round, first_idx, count, head FROM rounds ORDER BY round"):
            if first != covered or first + count > n or hashes[first + count] != head:
                raise ChainError(f"ledger {self.path}: round {rnd} (entries {first}..{first + count - 1}) does not "
                                 f"line up with the {n} entries stored")
            covered += count
        if covered != n:
            raise ChainError(f"ledger {self.path}: {n} entries but rounds account for {covered}")
        return n

    def instructed_steps(self) -> dict[str, int]:
        """Private steps each data holder was asked to run, over every attempt of every round (committed or
        not), keyed by the holder's stable identity rather than a Flower node id that changes at restarts."""
        rows = self._conn.execute("SELECT holder, SUM(steps) FROM instructions GROUP BY holder")
        return {str(holder): int(steps) for holder, steps in rows}

    # --------------------------------------------------------------------------------------- writing
    def record_instructions(self, rnd: int, holders: Sequence[str], steps: int) -> None:
        """Durably note, before sending, that these data holders are asked to run ``steps`` private steps: a
        node may spend privacy on a round that the server never commits (it crashed, or the reply was lost), so
        the server's accounting counts what it asked for, across restarts."""
        sent = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany("INSERT INTO instructions VALUES (?, ?, ?, ?)",
                                   [(rnd, h, steps, sent) for h in holders])
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
    def commit_round(self, rnd: int, updates: Sequence[tuple[int, float, int]],
                     metrics: dict[str, Any] | None = None) -> list[Entry]:
        """Append one round's (seed, coeff, node) updates atomically; returns the entries as committed."""
        last = self.last_round
        if rnd <= last:
            raise LedgerError(f"round {rnd} is already committed (last committed round is {last})")
        first = len(self)
        prev = self.hash_at(first)
        entries = []
        for k, (seed, coeff, node) in enumerate(updates):
            with np.errstate(over="ignore"):
                # Stored and replayed as float32, the wire format; + 0.0 turns -0.0 into 0.0, which SQLite
                # would otherwise store as the integer 0 and give back without its sign (found by hypothesis).
                c = float(np.float32(coeff)) + 0.0
            if not math.isfinite(c) or not 0 <= int(seed) < _U64 or not 0 <= int(node) < _U64:
                raise LedgerError(f"round {rnd}: refusing update {k} (seed {seed!r}, coeff {coeff!r}, node {node!r})")
            entries.append(Entry(first + k, int(seed), c, rnd, int(node)))
        rows = []
        for e in entries:
            prev = link(prev, e)
            rows.append((e.index, e.round, _to_i64(e.node), _to_i64(e.seed), e.coeff, prev))
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?)",
                         (rnd, first, len(entries), prev, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          json.dumps(metrics or {}, sort_keys=True)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return entries
