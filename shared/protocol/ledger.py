"""The ledger: the global model's whole history as hash-chained (seed, coeff, round) entries in SQLite.

A round adds one entry per seed, its coefficient the round's aggregate of the accepted scalars
(:mod:`shared.protocol.aggregation`), so replaying a round costs K direction generations whatever the number of
replies. Each reply's scalars and fate (accepted, or the rejection kind) go into the ``replies`` provenance
table in the same transaction: it is never replayed, but :meth:`Ledger.verify` recomputes every coefficient
from it under the round's recorded rule, and :meth:`Ledger.commit_round` refuses a round whose coefficients do
not follow from its accepted scalars.

Durability: WAL journal with ``synchronous=FULL`` and one transaction per round, so a crash at any point
leaves the file at the last committed round, never half a round. Rounds are committed in order, each number
once (1, 2, ... without gaps), so no entry is ever applied twice. Every entry row keeps its chain hash;
:meth:`Ledger.verify` recomputes the chain from the header and names the first entry that differs.

Two chains, both from the header's hash: the *entry chain* (:mod:`shared.protocol.chain`) is what replicas follow; the
*round chain* (format 5 on) covers everything else a round leaves: its rounds row, every reply's provenance and
every instruction recorded for it, on which the server's privacy accounting rests. Neither can tell, from the
file alone, a consistent rewrite or a file that lost its last rounds (a rolled-back copy, a lost WAL): an
:class:`Anchor` kept outside the file (the run folder's metrics, :mod:`server.report`) can, and
:meth:`Ledger.verify` compares against it when given one. With a server key, each round's position is signed
(:meth:`Ledger.check_signatures`): a rewrite by anyone without the key no longer verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import struct
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from seedtune.shared.protocol.aggregation import ACCEPTED, FEEDS, SECURE_SUM, RoundRule
from seedtune.shared.protocol.chain import ChainError, Entry, genesis, link, pack_tail
from google.protobuf.message import DecodeError

from seedtune.shared.protocol.identity import round_bytes, verify as signed_by
from seedtune.shared.protocol.transaction import immediate
from seedtune.shared.protocol.proto import LEDGER_FORMAT_VERSION, LEDGER_FORMATS_READ, LedgerHeader, LedgerTail

_U64 = 1 << 64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, round INTEGER NOT NULL, seed INTEGER NOT NULL, coeff REAL NOT NULL,
    hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS replies (
    round INTEGER NOT NULL, node INTEGER NOT NULL, holder TEXT NOT NULL, status TEXT NOT NULL,
    scalars BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS replies_by_round ON replies (round);
CREATE TABLE IF NOT EXISTS instructions (
    round INTEGER NOT NULL, holder TEXT NOT NULL, steps INTEGER NOT NULL, sent_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, first_idx INTEGER NOT NULL, count INTEGER NOT NULL, head BLOB NOT NULL,
    rule TEXT NOT NULL, lr REAL NOT NULL, trim REAL NOT NULL, committed_utc TEXT NOT NULL, metrics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (round INTEGER PRIMARY KEY, hash BLOB NOT NULL);
"""
# The server's signature over each committed round's position and record (shared.protocol.identity.round_bytes), with
# federation.server_key; a table of its own, so that ledgers written before it still open as they were.
_SIGNATURES = "CREATE TABLE IF NOT EXISTS signatures (round INTEGER PRIMARY KEY, signature BLOB NOT NULL)"
ROUND_CHAIN_FORMAT = 5  # the first ledger format whose rounds, replies and instructions are chained (records)


@dataclass(frozen=True)
class Provenance:
    """One reply of a round, as the server judged it: which node and data holder sent it, ``accepted`` or the
    rejection kind, and its float32 scalars (little-endian, one per seed; empty if none could be read)."""

    node: int
    holder: str
    status: str
    scalars: bytes = b""

    def values(self) -> np.ndarray:
        return np.frombuffer(self.scalars, dtype="<f4")


def check_feeds(replies: Sequence[Provenance], header: LedgerHeader) -> None:
    """A round's coefficients come from its accepted replies' scalars, or, in a secure-aggregation ledger (its
    header's noise is Skellam), from exactly one aggregate row of node 0 and nothing else: ValueError otherwise."""
    secure = [p for p in replies if p.status == SECURE_SUM]
    if header.noise != "skellam":
        if secure:
            raise ValueError("a secure_sum row in a ledger without secure aggregation")
        return
    if any(p.status == ACCEPTED for p in replies) or len(secure) > 1 or any(p.node != 0 for p in secure):
        raise ValueError("a secure round's coefficients come from one node-0 secure_sum row and no reply's scalars")


class LedgerError(RuntimeError):
    """The ledger file is missing, of another format, for another run, or fails its hash chain."""


@dataclass(frozen=True)
class Anchor:
    """The round chain's head after ``round``, as recorded outside the ledger file: a ledger that no longer
    reaches it, or reaches it by another history, went backwards or was rewritten."""

    round: int
    record: str  # hex of the round record hash (:func:`round_record`)
    source: str = ""  # where it was read, for the error message


def round_record(prev: bytes, row: Sequence[Any], replies: Sequence[Provenance],
                 instructions: Sequence[tuple[str, int, str]]) -> bytes:
    """Hash of one round's record chained on ``prev``: its rounds row (round, first index, count, entry chain
    head, rule, lr, trim, commit time, metrics), its replies' provenance and the instructions recorded for it.
    Replies and instructions enter in sorted order, so the hash does not depend on SQLite row ids."""
    rnd, first, count, head, rule, lr, trim, committed, metrics = row
    content = {
        "round": rnd, "first": first, "count": count, "head": _blob(head, f"round {rnd}'s head").hex(), "rule": rule, "lr": float(lr),
        "trim": float(trim), "committed_utc": committed, "metrics": metrics,
        "replies": sorted([p.node, p.holder, p.status, p.scalars.hex()] for p in replies),
        "instructions": sorted([h, int(steps), sent] for h, steps, sent in instructions),
    }
    return hashlib.sha256(prev + json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).digest()


def _blob(value: Any, what: str) -> bytes:
    """A BLOB column's value; anything else (``bytes(n)`` of a damaged integer would allocate n bytes) is a
    named error."""
    if not isinstance(value, bytes):
        raise ChainError(f"{what} is stored as {type(value).__name__}, not bytes: the ledger was modified")
    return value


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
    def _connect(cls, path: Path, read_only: bool = False) -> sqlite3.Connection:
        """A connection for writing (WAL, synchronous commits), or a read-only one that changes nothing in the
        file: no journal mode switched, no page written, and a file that is no database stays as it was."""
        if read_only:
            return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        conn = sqlite3.connect(str(path), isolation_level=None)  # explicit BEGIN/COMMIT only
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False) -> "Ledger":
        """The ledger at ``path``; ``read_only`` for whoever only reads it (verify, replay, export, a model
        card): those must never write to a file they were asked to check."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"ledger {str(path)!r} does not exist")
        try:
            conn = cls._connect(path, read_only)
            row = conn.execute("SELECT value FROM meta WHERE key = 'header'").fetchone()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise LedgerError(f"{str(path)!r} is not a seedtune ledger, or a damaged one ({exc})") from exc
        if row is None:
            conn.close()
            raise LedgerError(f"{str(path)!r} has no ledger header")
        try:
            header = LedgerHeader.FromString(row[0])
        except (DecodeError, TypeError) as exc:
            conn.close()
            raise LedgerError(f"{str(path)!r} has a damaged ledger header ({exc})") from exc
        kinds = LEDGER_FORMATS_READ.get(header.format_version)
        if kinds is None:
            conn.close()
            raise LedgerError(f"ledger {str(path)!r} has format version {header.format_version}; this seedtune "
                              f"reads versions {sorted(LEDGER_FORMATS_READ)}")
        if header.direction not in kinds:
            conn.close()
            raise LedgerError(f"ledger {str(path)!r} (format {header.format_version}) uses {header.direction!r} "
                              f"directions, whose stream changed in format {LEDGER_FORMAT_VERSION}: replay it with "
                              f"the seedtune that wrote it")
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
    def open_or_create(cls, path: str | Path, make_header: Callable[[], LedgerHeader], **pinned: str) -> "Ledger":
        """Resume the ledger at ``path`` if its header pins the same values (``pinned``: header field -> value,
        e.g. config_json, base_model_digest), else create it with ``make_header()``, which is called only then
        (a federation calibrates its noise there)."""
        if not Path(path).exists():
            header = make_header()
            for field, value in pinned.items():
                if getattr(header, field) != value:
                    raise LedgerError(f"the new ledger's header has {field} {getattr(header, field)!r:.80}, "
                                      f"expected {value!r:.80}")
            return cls.create(path, header)
        ledger = cls.open(path)
        if ledger.header.format_version != LEDGER_FORMAT_VERSION:
            ledger.close()
            raise LedgerError(f"ledger {str(path)!r} has format {ledger.header.format_version}, written by an older "
                              f"seedtune: replay or verify it, but continue in a new run folder (out_dir), which "
                              f"gets format {LEDGER_FORMAT_VERSION}")
        for field, value in pinned.items():
            if getattr(ledger.header, field) != value:
                ledger.close()
                raise LedgerError(f"ledger {str(path)!r} was started with a different {field}; resume with the "
                                  f"same settings, or choose a new run folder (out_dir)")
        return ledger

    def close(self) -> None:
        self._conn.close()

    # --------------------------------------------------------------------------------------- reading
    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Every row of one read; a damaged file is a :class:`LedgerError` naming it, not a raw sqlite3 error."""
        try:
            return self._conn.execute(sql, args).fetchall()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:  # a damaged page, or text that is not UTF-8
            raise LedgerError(f"ledger {self.path} is damaged ({exc}): restore it from a copy") from exc

    def __len__(self) -> int:
        return self._rows("SELECT COUNT(*) FROM entries")[0][0]

    @property
    def last_round(self) -> int:
        return self._rows("SELECT COALESCE(MAX(round), 0) FROM rounds")[0][0]

    @property
    def chains_rounds(self) -> bool:
        """Whether this ledger's rounds, replies and instructions are chained (format 5 on)."""
        return self.header.format_version >= ROUND_CHAIN_FORMAT

    def record_at(self, rnd: int) -> bytes:
        """The round chain's head after round ``rnd`` (the genesis hash for 0)."""
        if rnd == 0:
            return self.genesis
        row = next(iter(self._rows("SELECT hash FROM records WHERE round = ?", (rnd,))), None)
        if row is None:
            raise LedgerError(f"ledger has no record of round {rnd} (last round {self.last_round})")
        return _blob(row[0], f"the record of round {rnd}")

    def hash_at(self, version: int) -> bytes:
        """Chain hash of the model after ``version`` entries (the genesis hash for 0)."""
        if version == 0:
            return self.genesis
        row = next(iter(self._rows("SELECT hash FROM entries WHERE idx = ?", (version - 1,))), None)
        if row is None:
            raise LedgerError(f"ledger has {len(self)} entries; no version {version}")
        return row[0]

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        stop = len(self) if stop is None else stop
        for idx, rnd, seed, coeff in self._rows(
                "SELECT idx, round, seed, coeff FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, stop)):
            yield Entry(idx, _to_u64(seed), coeff, rnd)

    def replies(self, rnd: int) -> list[Provenance]:
        """The provenance of one round: every reply the server judged, in the order it was recorded."""
        rows = self._rows("SELECT node, holder, status, scalars FROM replies WHERE round = ? ORDER BY rowid",
                                  (rnd,))
        return [Provenance(_to_u64(node), holder, status, _blob(scalars, f"a reply's scalars in round {rnd}"))
                for node, holder, status, scalars in rows]

    def tail(self, start: int) -> LedgerTail:
        """The entries from ``start`` on, packed for a client at version ``start``."""
        end = len(self)
        if not 0 <= start <= end:
            raise LedgerError(f"tail start {start} outside the ledger (0..{end})")
        return pack_tail(list(self.entries(start, end)), self.hash_at(start), self.hash_at(end), start)

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT round, first_idx, count, rule, lr, trim, committed_utc, metrics FROM rounds ORDER BY round")
        return [{"round": r, "first_index": i, "entries": c, "rule": rule, "lr": lr, "trim": trim,
                 "committed_utc": t, "metrics": json.loads(m)} for r, i, c, rule, lr, trim, t, m in rows]

    def verify(self, anchor: Anchor | Sequence[Anchor] | None = None) -> int:
        """Recompute the whole entry chain, the round bookkeeping (rounds 1..N, each covering its entries),
        every coefficient from the provenance table and, from format 5 on, the round chain over rounds, replies
        and instructions; then compare with each ``anchor`` given. One read transaction: a server committing
        meanwhile is seen either before or after its round, never half-way. Returns the number of entries."""
        anchors = [] if anchor is None else [anchor] if isinstance(anchor, Anchor) else list(anchor)
        self._conn.execute("BEGIN")
        try:
            n = self._verify()
            for each in anchors:
                self._check_anchor(each)
            return n
        except ChainError:
            raise
        except (TypeError, ValueError, OverflowError, struct.error) as exc:  # a value of the wrong type or range
            raise ChainError(f"ledger {self.path}: a stored value is damaged ({type(exc).__name__}: {exc}): the "
                             f"file was modified") from exc
        finally:  # a read transaction: ending it loses nothing, and on a damaged file the error is raised above
            with contextlib.suppress(sqlite3.DatabaseError):
                self._conn.execute("ROLLBACK")

    def _verify(self) -> int:
        hashes = [self.genesis]  # hashes[v]: chain hash at version v
        coeffs, entry_rounds = [], []
        for idx, rnd, seed, coeff, stored in self._rows("SELECT idx, round, seed, coeff, hash FROM entries ORDER BY idx"):
            if idx != len(hashes) - 1:
                raise ChainError(f"ledger {self.path}: entry index {len(hashes) - 1} is missing (found {idx})")
            hashes.append(link(hashes[-1], Entry(idx, _to_u64(seed), coeff, rnd)))
            coeffs.append(coeff)
            entry_rounds.append(rnd)
            if hashes[-1] != stored:
                raise ChainError(f"ledger {self.path}: entry {idx} (round {rnd}) does not match its chain hash: "
                                 f"the file was modified")
        n = len(hashes) - 1
        covered = 0
        record = self.genesis
        records = dict(self._rows("SELECT round, hash FROM records")) if self.chains_rounds else {}
        rows = self._rows("SELECT round, first_idx, count, head, rule, lr, trim, committed_utc, metrics FROM rounds "
                          "ORDER BY round")
        for position, row in enumerate(rows, start=1):
            rnd, first, count, head, rule, lr, trim = row[:7]
            if rnd != position:
                raise ChainError(f"ledger {self.path}: round {rnd} follows round {position - 1}: rounds run 1, 2, ... "
                                 f"without gaps, so the rounds were renumbered or one was removed")
            if first != covered or first + count > n or hashes[first + count] != head:
                raise ChainError(f"ledger {self.path}: round {rnd} (entries {first}..{first + count - 1}) does not "
                                 f"line up with the {n} entries stored")
            if any(r != rnd for r in entry_rounds[first: first + count]):
                raise ChainError(f"ledger {self.path}: entries {first}..{first + count - 1} are not all of round "
                                 f"{rnd}: the rounds were renumbered")
            replies = self.replies(rnd)
            expected = self._coefficients(rnd, replies, RoundRule(rule, lr, trim), count)
            if not np.array_equal(expected, np.asarray(coeffs[first: first + count], dtype=np.float32)):
                raise ChainError(f"ledger {self.path}: the coefficients of round {rnd} do not follow from its "
                                 f"accepted replies under rule {rule} (lr {lr}): the provenance was modified")
            if self.chains_rounds:
                record = round_record(record, row, replies, self._instructions(rnd))
                if records.get(rnd) != record:
                    raise ChainError(f"ledger {self.path}: round {rnd} does not match its record hash: its rounds "
                                     f"row, replies or instructions were modified (or an earlier round's were)")
            covered += count
        if covered != n:
            raise ChainError(f"ledger {self.path}: {n} entries but rounds account for {covered}")
        if set(records) - set(range(1, len(rows) + 1)):
            raise ChainError(f"ledger {self.path}: records of rounds {sorted(set(records) - set(range(1, len(rows) + 1)))[:5]} "
                             f"without a rounds row: rounds were removed")
        (late,) = self._rows("SELECT MIN(round), MAX(round) FROM instructions WHERE round < 1 OR round > ?",
                             (len(rows) + 1,))
        if late[0] is not None:
            raise ChainError(f"ledger {self.path}: instructions recorded for rounds {late[0]}..{late[1]}, but only "
                             f"round {len(rows) + 1} can be pending after {len(rows)} committed rounds")
        return n

    def secure_rounds(self) -> int:
        """How many rounds were securely aggregated: their coefficients follow from a stored per-seed aggregate,
        and no node's own scalars were ever seen, so none can be checked."""
        return int(self._rows("SELECT COUNT(DISTINCT round) FROM replies WHERE status = ?", (SECURE_SUM,))[0][0])

    def signed_rounds(self) -> int:
        """How many rounds carry a server signature (0 for a ledger written without a server key)."""
        if not self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'signatures'"):
            return 0
        return int(self._rows("SELECT COUNT(*) FROM signatures")[0][0])

    def check_signatures(self, public: str, setting: str = "the server key") -> int:
        """Check that every committed round is signed by ``public`` (an OpenSSH public key line) over its
        position and its round record (:func:`shared.protocol.identity.round_bytes`); returns the number of rounds
        checked. A ledger rewritten by anyone without the private key (a new header, rounds dropped or changed,
        instructions or replies edited, every hash recomputed) fails here by the round it first differs at.
        One read transaction, so a server committing meanwhile is seen before or after its round."""
        self._conn.execute("BEGIN")
        try:
            signatures = dict(self._rows("SELECT round, signature FROM signatures")) if self.signed_rounds() else {}
            rounds = self._rows("SELECT round, first_idx, count, head FROM rounds ORDER BY round")
            records = dict(self._rows("SELECT round, hash FROM records")) if self.chains_rounds else {}
        finally:
            with contextlib.suppress(sqlite3.DatabaseError):
                self._conn.execute("ROLLBACK")
        digest = self.genesis.hex()
        for rnd, first, count, head in rounds:
            signature = signatures.get(rnd)
            if signature is None:
                raise ChainError(f"ledger {self.path}: round {rnd} carries no signature, where {setting} signs "
                                 f"every round: the ledger was written without the key, or rewritten")
            signed = round_bytes(digest, rnd, first + count, _blob(head, f"round {rnd}'s head"),
                                 _blob(records.get(rnd, b""), f"round {rnd}'s record"))
            if not signed_by(public, signed, _blob(signature, f"round {rnd}'s signature")):
                raise ChainError(f"ledger {self.path}: round {rnd} is not signed by {setting}: the ledger (its "
                                 f"header, history, instructions or replies) was rewritten by someone without the "
                                 f"key, or the key changed")
        return len(rounds)

    def _check_anchor(self, anchor: Anchor) -> None:
        where = f" ({anchor.source})" if anchor.source else ""
        last = self.last_round
        if last < anchor.round:
            raise ChainError(f"ledger {self.path} ends at round {last}, but its anchor{where} records round "
                             f"{anchor.round}: the ledger went backwards (a rolled-back copy or a lost WAL)")
        if not self.chains_rounds:
            raise ChainError(f"ledger {self.path} has format {self.header.format_version}, without round records; "
                             f"it cannot be checked against an anchor{where}")
        if self.record_at(anchor.round).hex() != anchor.record:
            raise ChainError(f"ledger {self.path}: round {anchor.round} differs from its anchor{where} (record "
                             f"{self.record_at(anchor.round).hex()[:16]} vs {anchor.record[:16]}): the history "
                             f"was rewritten")

    def _coefficients(self, rnd: int, replies: Sequence[Provenance], rule: RoundRule, count: int) -> np.ndarray:
        """What a round's coefficients must be: its rule over the accepted scalars (none if nothing accepted)."""
        try:
            check_feeds(replies, self.header)
        except ValueError as exc:
            raise ChainError(f"ledger {self.path}: round {rnd}: {exc}: the provenance was modified") from exc
        accepted = [p.values() for p in replies if p.status in FEEDS]
        if not accepted:
            return np.zeros(0, dtype=np.float32)
        if any(v.size != count for v in accepted):
            raise ChainError(f"ledger {self.path}: round {rnd} has {count} entries but accepted replies carry "
                             f"{sorted({v.size for v in accepted})} scalars")
        return rule.coefficients(np.stack(accepted))

    def _instructions(self, rnd: int) -> list[tuple[str, int, str]]:
        """The (holder, steps, sent time) rows recorded for round ``rnd``, over all its attempts."""
        return [(str(h), int(steps), str(sent)) for h, steps, sent in self._rows(
            "SELECT holder, steps, sent_utc FROM instructions WHERE round = ?", (rnd,))]

    def instructed_steps(self) -> dict[str, int]:
        """Private steps each data holder was asked to run, over every attempt of every round (committed or
        not), keyed by the holder's stable identity rather than a Flower node id that changes at restarts."""
        rows = self._rows("SELECT holder, SUM(steps) FROM instructions GROUP BY holder")
        return {str(holder): int(steps) for holder, steps in rows}

    # --------------------------------------------------------------------------------------- writing
    def record_instructions(self, rnd: int, holders: Sequence[str], steps: int) -> None:
        """Durably note, before sending, that these data holders are asked to run ``steps`` private steps: a
        node may spend privacy on a round that the server never commits (it crashed, or the reply was lost), so
        the server's accounting counts what it asked for, across restarts."""
        sent = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with immediate(self._conn) as conn:
            conn.executemany("INSERT INTO instructions VALUES (?, ?, ?, ?)", [(rnd, h, steps, sent) for h in holders])

    def commit_round(self, rnd: int, seeds: Sequence[int], coeffs: Sequence[float] | np.ndarray,
                     replies: Sequence[Provenance], rule: RoundRule, metrics: dict[str, Any] | None = None,
                     sign: Callable[[bytes], bytes] | None = None) -> list[Entry]:
        """Append one round atomically: one entry per seed with the caller's coefficient, and every reply's
        provenance. The coefficients must be the rule's aggregate of the accepted replies' scalars (none if
        nothing was accepted): a round that does not follow from its provenance is refused, unwritten. With
        ``sign`` (bytes -> signature), the round is signed in the same transaction, over its position and its
        round record (:func:`shared.protocol.identity.round_bytes`). Returns the entries as committed."""
        last = self.last_round
        if rnd != last + 1:
            raise LedgerError(f"round {rnd} cannot follow round {last}: rounds are committed once each, in order")
        try:
            check_feeds(replies, self.header)
        except ValueError as exc:
            raise LedgerError(f"round {rnd}: {exc}") from exc
        accepted = [p.values() for p in replies if p.status in FEEDS]
        if accepted and any(v.size != len(seeds) for v in accepted):
            raise LedgerError(f"round {rnd}: accepted replies carry {sorted({v.size for v in accepted})} scalars "
                              f"for {len(seeds)} seeds")
        expected = rule.coefficients(np.stack(accepted)) if accepted else np.zeros(0, dtype=np.float32)
        given = np.asarray(coeffs, dtype=np.float64)
        if given.shape != expected.shape or not np.array_equal(given, expected.astype(np.float64), equal_nan=False):
            raise LedgerError(f"round {rnd}: coefficients {given.tolist()[:4]} do not follow from the accepted "
                              f"replies under rule {rule.rule} (expected {expected.tolist()[:4]})")
        first = len(self)
        prev = self.hash_at(first)
        entries = []
        for k, (seed, c) in enumerate(zip(seeds, coeffs)):
            if not math.isfinite(float(c)) or not 0 <= int(seed) < _U64:
                raise LedgerError(f"round {rnd}: refusing entry {k} (seed {seed!r}, coeff {c!r})")
            entries.append(Entry(first + k, int(seed), float(c), rnd))
        rows = []
        for e in entries:
            prev = link(prev, e)
            rows.append((e.index, e.round, _to_i64(e.seed), e.coeff, prev))
        round_row = (rnd, first, len(entries), prev, rule.rule, float(rule.lr), float(rule.trim),
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), json.dumps(metrics or {}, sort_keys=True))
        with immediate(self._conn) as conn:
            conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT INTO replies VALUES (?, ?, ?, ?, ?)",
                             [(rnd, _to_i64(p.node), p.holder, p.status, p.scalars) for p in replies])
            conn.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", round_row)
            record = b""
            if self.chains_rounds:
                record = round_record(self.record_at(rnd - 1), round_row, replies, self._instructions(rnd))
                conn.execute("INSERT INTO records VALUES (?, ?)", (rnd, record))
            if sign is not None:
                signed = round_bytes(self.genesis.hex(), rnd, first + len(entries), prev, record)
                conn.execute(_SIGNATURES)
                conn.execute("INSERT INTO signatures VALUES (?, ?)", (rnd, sign(signed)))
        return entries
