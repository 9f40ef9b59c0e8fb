"""A data holder's privacy ledger: every release a node made from its data, on the node's own disk.

The budget belongs to whoever holds the data, not to a Flower run, a process or the records a server selects: a
restarted SuperNode, a resumed federation, a second federation and an instruction that filters or reorders the
holder's records all spend from one budget, keyed by the holder's name (node config ``holder``; a simulated
node's partition). A holder that keeps separate budgets for separate data sets says so in its node config
(``budget-scope``). Releases from the held-out data (node evaluation) are charged to the holder's held-out
budget (:func:`heldout_budget`): its records are not the training records, so each record's loss is in one of
the two (parallel composition at the record level); a holder whose held-out file shares records with its
training file must not use node evaluation.

Each row is one instruction answered: the request it answered (ledger, round, version, seeds), the noise and
sampling rate of its steps and the exact reply bytes sent. A row is written, in one SQLite transaction that
first re-checks the budget, *before* the reply leaves the node, so a crash can only over-count; an instruction
delivered twice gets the stored bytes back instead of a second, fresh release.

The same file keeps, per data holder and federation ledger, the furthest position (version, chain head) the
node has followed (:meth:`PrivacyLedger.follow`): the node's anchor, outside the server's reach. A server whose
ledger went backwards or forked since (a restored backup, a lost WAL, a rewritten history) is refused even by
a node that restarted and kept nothing else (client.node). A node that pins its server's key (node config
``server-key``) also keeps, per server key, the one ledger header it follows from that server (the ``servers``
table): another header signed by the same key is a fork, refused until the node's operator runs ``seedtune
holder forget-server``.

The file is precious: deleting it would forget what was spent. Its default home is a data folder, not a cache
(:func:`default_path`); a deployed node never creates one (``seedtune holder init`` does, once per holder) and
refuses to run when its file is missing or unreadable, naming it. ``seedtune holder backup`` copies it safely
while nodes run. Simulated holders (simulated nodes) get theirs created on first use.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from seedtune.shared.privacy.accounting import PrivacyAccountant
from seedtune.shared.privacy.noise import Noise
from seedtune.shared.protocol.run_folder import PRIVACY_LEDGER_FILE
from seedtune.shared.protocol.transaction import immediate

log = logging.getLogger(__name__)

FORMAT = 3  # 3: releases keyed by holder budget (2, unmarked: keyed by a digest of the records selected)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    budget TEXT NOT NULL, request TEXT NOT NULL, noise TEXT NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, reply BLOB NOT NULL, released_utc TEXT NOT NULL, PRIMARY KEY (budget, request));
CREATE TABLE IF NOT EXISTS followed (
    holder TEXT NOT NULL, ledger TEXT NOT NULL, version INTEGER NOT NULL, head BLOB NOT NULL,
    followed_utc TEXT NOT NULL, PRIMARY KEY (holder, ledger));
CREATE TABLE IF NOT EXISTS servers (
    holder TEXT NOT NULL, server_key TEXT NOT NULL, ledger TEXT NOT NULL, pinned_utc TEXT NOT NULL,
    PRIMARY KEY (holder, server_key));
"""
NON_PRIVATE = ""  # the noise column of a release without privacy: it spends an infinite epsilon
LEGACY = "legacy:"  # a format-2 release's key: it was keyed by records, so it counts against every budget here
_OLD_DEFAULT = Path.home() / ".cache" / "seedtune" / PRIVACY_LEDGER_FILE  # the format-2 default home


class BudgetExceeded(RuntimeError):
    """The release would take the data holder past its (epsilon, delta) budget."""


class PrivacyLedgerError(ValueError):
    """The holder's privacy ledger is missing or unreadable: the node refuses to work rather than start afresh."""


def default_path() -> Path:
    """``$SEEDTUNE_PRIVACY_LEDGER``, else ``$XDG_DATA_HOME/seedtune/privacy-ledger.sqlite`` (by default under
    ``~/.local/share``): a folder for data users keep, not a cache they clear."""
    if os.environ.get("SEEDTUNE_PRIVACY_LEDGER"):
        return Path(os.environ["SEEDTUNE_PRIVACY_LEDGER"])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "seedtune" / PRIVACY_LEDGER_FILE


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _missing(path: Path) -> str:
    old = (f"; the privacy ledger of an earlier seedtune is at {_OLD_DEFAULT}: move it to {path}"
           if _OLD_DEFAULT.is_file() and _OLD_DEFAULT.resolve() != path.resolve() else "")
    return (f"no privacy ledger at {path}: it keeps what this node's data holders have spent, and a node never "
            f"starts a fresh one by itself (a deleted or moved file would reset their budgets). Restore it from its "
            f"backup, or create it once with: seedtune holder init --ledger {path}{old}")


def heldout_budget(budget: str) -> str:
    """The budget the holder's held-out data (node evaluation) is charged to, beside its training budget."""
    return f"{budget}#held-out"


def data_key(records: Iterable[tuple[Sequence[str], str]]) -> str:
    """SHA-256 of records in order, each its text fields and its label as the data spell them: which data a run
    used (a trainer's resume checks it, client.trainer). Nothing a config chooses enters it."""
    h = hashlib.sha256(b"seedtune-holder-v2\0")
    for texts, label in records:
        for text in texts:
            h.update(f"{len(text)}:{text}\0".encode())
        h.update(f"{len(label)}:{label}\0".encode())
    return h.hexdigest()


def request_key(header_digest: str, rnd: int, version: int, seeds: Sequence[int]) -> str:
    """Which instruction a reply answered: the same ledger, round, model version and seeds."""
    return hashlib.sha256(f"{header_digest}\0{rnd}\0{version}\0{','.join(map(str, seeds))}".encode()).hexdigest()


@dataclass(frozen=True)
class Budget:
    """The data holder's own (epsilon, delta): set in its node config, never taken from the server."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon-budget must be positive and finite, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")


Run = tuple[Noise | None, float, int]  # (noise, sampling rate, steps); no noise: a non-private release


class PrivacyLedger:
    """The releases of every data holder this node serves, in one SQLite file (WAL, synchronous=FULL).

    ``create``: make the file if it is missing (``seedtune holder init``, simulated holders); otherwise a
    missing file is a :class:`PrivacyLedgerError` naming it, as is a file that is not a privacy ledger."""

    def __init__(self, path: str | Path | None = None, create: bool = False) -> None:
        self.path = Path(path) if path else default_path()
        if not self.path.is_file():
            if not create:
                raise PrivacyLedgerError(_missing(self.path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)
            if not create and not self._tables():  # checked before anything is written to the file
                raise PrivacyLedgerError(f"{self.path} holds no privacy ledger (an empty file?); restore it from "
                                         f"its backup, or create one with seedtune holder init --ledger {self.path}")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._prepare()
        except sqlite3.DatabaseError as exc:
            raise PrivacyLedgerError(f"{self.path} is not a readable privacy ledger ({exc}); restore it from its "
                                     f"backup: a node never starts a fresh budget in place of an unreadable one") from None

    def _tables(self) -> set[str]:
        return {n for (n,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _prepare(self) -> None:
        """Check the format, move a format-2 file to format 3, or lay out a new file, in one transaction."""
        with immediate(self._conn):
            tables = self._tables()
            if "meta" in tables:
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
                if row is None or row[0] != str(FORMAT):
                    raise PrivacyLedgerError(f"{self.path}: privacy ledger format {row[0] if row else '?'}; this "
                                             f"seedtune reads format {FORMAT}")
                self._lay_out()  # tables added within the format (servers), for a file written before them
            elif "releases" in tables:  # format 2: keyed by a digest of the records an instruction selected
                self._conn.execute("ALTER TABLE releases RENAME COLUMN data_key TO budget")
                self._conn.execute("UPDATE releases SET budget = ? || budget", (LEGACY,))
                self._lay_out()  # the meta table (the others exist)
                self._conn.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT),))
                log.warning("%s: a format-2 privacy ledger (keyed by records); its releases now count against "
                            "every budget it serves", self.path)
            else:  # a new file (only with create: see __init__)
                self._lay_out()
                self._conn.execute("INSERT INTO meta VALUES ('format', ?)", (str(FORMAT),))
                self._conn.execute("INSERT INTO meta VALUES ('created_utc', ?)", (_now(),))
                log.info("new privacy ledger %s", self.path)

    def _lay_out(self) -> None:
        for statement in _SCHEMA.split(";"):  # (executescript would commit the open transaction)
            if statement.strip():
                self._conn.execute(statement)

    def close(self) -> None:
        self._conn.close()

    def _releases(self, budget: str, columns: str) -> sqlite3.Cursor:
        """The rows charged to ``budget``: its own, and every format-2 release (whose holder is unknown)."""
        return self._conn.execute(f"SELECT {columns} FROM releases WHERE budget = ? OR substr(budget, 1, ?) = ? "
                                  f"ORDER BY rowid", (budget, len(LEGACY), LEGACY))

    def accountant(self, budget: str) -> PrivacyAccountant:
        """The releases charged to ``budget`` (a holder's name, see :class:`client.node.Holder`), in order."""
        accountant = PrivacyAccountant()
        for noise, rate, steps in self._releases(budget, "noise, sample_rate, steps"):
            accountant.record(Noise.from_json(noise) if noise != NON_PRIVATE else None, rate, steps)
        return accountant

    def epsilon(self, budget: str, delta: float, extra: Run | None = None) -> float:
        """The budget's epsilon at ``delta`` over every recorded release (plus ``extra`` steps, if given)."""
        accountant = self.accountant(budget)
        return (accountant.after(*extra) if extra else accountant).epsilon(delta)

    def keys(self) -> list[str]:
        """The budgets with releases in this ledger (format-2 releases under their ``legacy:`` keys)."""
        return [k for (k,) in self._conn.execute("SELECT DISTINCT budget FROM releases ORDER BY budget")]

    def steps(self, budget: str) -> int:
        return sum(int(steps) for (steps,) in self._releases(budget, "steps"))

    def summary(self, delta: float) -> list[dict[str, Any]]:
        """Per budget: its releases, private steps and epsilon at ``delta`` (``seedtune holder status``)."""
        return [{"budget": k, "releases": sum(1 for _ in self._releases(k, "steps")), "steps": self.steps(k),
                 "epsilon": self.epsilon(k, delta)} for k in self.keys()]

    def backup(self, dest: str | Path) -> None:
        """A consistent copy at ``dest`` (SQLite's online backup: safe while nodes write)."""
        dest = Path(dest)
        if dest.exists():
            raise PrivacyLedgerError(f"{dest} exists; name a new file for the backup")
        copy = sqlite3.connect(str(dest))
        try:
            self._conn.backup(copy)
        finally:
            copy.close()

    def followed(self, holder: str, ledger: str) -> tuple[int, bytes] | None:
        """The furthest (version, chain head) this holder's node followed ledger ``ledger`` (its header
        digest) to, or None."""
        row = self._conn.execute("SELECT version, head FROM followed WHERE holder = ? AND ledger = ?",
                                 (holder, ledger)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def follow(self, holder: str, ledger: str, version: int, head: bytes) -> None:
        """Durably note the position followed; the anchor only moves forward."""
        self._conn.execute(
            "INSERT INTO followed VALUES (?, ?, ?, ?, ?) ON CONFLICT (holder, ledger) DO UPDATE SET "
            "version = excluded.version, head = excluded.head, followed_utc = excluded.followed_utc "
            "WHERE excluded.version > followed.version",
            (holder, ledger, int(version), head, _now()))

    def pin_server(self, holder: str, server_key: str, ledger: str) -> str:
        """The ledger (header digest) this holder follows from the server with ``server_key``: the one pinned,
        or ``ledger``, pinned now if none was. One write transaction, so two first contacts with different
        headers cannot both be pinned."""
        with immediate(self._conn) as conn:
            row = conn.execute("SELECT ledger FROM servers WHERE holder = ? AND server_key = ?",
                               (holder, server_key)).fetchone()
            if row is not None:
                return str(row[0])
            conn.execute("INSERT INTO servers VALUES (?, ?, ?, ?)", (holder, server_key, ledger, _now()))
        return ledger

    def forget_server(self, server_key: str, holder: str | None = None) -> int:
        """The operator's reset (``seedtune holder forget-server``): unpin the ledger followed from the server
        with ``server_key`` (for one holder, or all), so that the next ledger it signs may be followed. Budgets
        and anchors stay. Returns the number of pins removed."""
        sql, args = "DELETE FROM servers WHERE server_key = ?", [server_key]
        if holder is not None:
            sql, args = sql + " AND holder = ?", [*args, holder]
        return self._conn.execute(sql, args).rowcount

    def reply_for(self, key: str, request: str) -> bytes | None:
        row = self._conn.execute("SELECT reply FROM releases WHERE budget = ? AND request = ?",
                                 (key, request)).fetchone()
        return None if row is None else bytes(row[0])

    def check(self, key: str, run: Run, budget: Budget | None) -> float:
        """The epsilon after ``run``; :class:`BudgetExceeded` if that passes the budget (None: no budget)."""
        if budget is None:  # a simulated node of a non-private federation: nothing to keep
            return math.inf
        after = self.epsilon(key, budget.delta, run)
        if after > budget.epsilon:
            spent = self.epsilon(key, budget.delta)
            log.warning("data holder budget reached; its privacy ledger is %s", self.path)
            raise BudgetExceeded(f"{run[2]} more steps would bring this data holder from epsilon {spent:.3f} to "
                                 f"{after:.3f} > its budget {budget.epsilon} (delta {budget.delta})")
        return after

    def record(self, key: str, request: str, run: Run, budget: Budget | None, reply: bytes,
               beside: Sequence[tuple[str, Run]] = ()) -> None:
        """Durably note the release and its reply bytes, re-checking the budget inside the transaction (another
        process may serve the same holder); raises :class:`BudgetExceeded` and records nothing if it no longer
        fits. ``beside``: the same release as other budgets see it (a secure round's local guarantee), written in
        the same transaction, unchecked. Call before the reply is sent."""
        with immediate(self._conn) as conn:
            self.check(key, run, budget)
            conn.executemany("INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(k, request, NON_PRIVATE if noise is None else noise.to_json(), float(rate), int(steps),
                               reply, _now()) for k, (noise, rate, steps) in [(key, run), *beside]])


_LEDGERS: dict[Path, PrivacyLedger] = {}


def open_privacy_ledger(path: str | Path | None = None, create: bool = False) -> PrivacyLedger:
    """One open ledger per file and process (a simulation actor serves many nodes), reopened if its file was
    deleted (so that a deployed node refuses from then on); ``create`` as :class:`PrivacyLedger`."""
    resolved = (Path(path) if path else default_path()).resolve()
    if resolved in _LEDGERS and not resolved.is_file():  # deleted under a running node: never spend into a ghost
        _LEDGERS.pop(resolved).close()
    if resolved not in _LEDGERS:
        _LEDGERS[resolved] = PrivacyLedger(resolved, create)
        log.info("privacy ledger of this node's data holders: %s", resolved)
    return _LEDGERS[resolved]


def init(path: str | Path | None = None) -> PrivacyLedger:
    """``seedtune holder init``: create a holder's privacy ledger; an existing one is never replaced."""
    path = Path(path) if path else default_path()
    if path.exists():
        raise PrivacyLedgerError(f"{path} exists: a privacy ledger is never replaced (it would forget what was "
                                 f"spent); to reset a budget on purpose, its operator deletes the file first")
    return PrivacyLedger(path, create=True)
