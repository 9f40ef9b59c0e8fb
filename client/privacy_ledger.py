"""A data holder's privacy ledger: every release a node made from its data, on the node's own disk.

The budget belongs to whoever holds the data, not to a Flower run or a process: a restarted SuperNode, a
resumed federation and a second federation over the same records all spend from the same ledger. Releases
are keyed by a digest of the records (:func:`data_key`; computed on the node, never sent), so two runs over
the same data share one history whatever their model, task name, prompt or node id.

Each row is one instruction answered: the request it answered (ledger, round, version, seeds), the noise and
sampling rate of its steps and the exact reply bytes sent. A row is written, in one SQLite transaction that
first re-checks the budget, *before* the reply leaves the node, so a crash can only over-count; an instruction
delivered twice gets the stored bytes back instead of a second, fresh release.

The same file keeps, per data holder and federation ledger, the furthest position (version, chain head) the
node has followed (:meth:`PrivacyLedger.follow`): the node's anchor, outside the server's reach. A server whose
ledger went backwards or forked since (a restored backup, a lost WAL, a rewritten history) is refused even by
a node that restarted and kept nothing else (client.node).

Location: node config ``privacy-ledger``, else ``$SEEDTUNE_PRIVACY_LEDGER``, else ``<cache>/privacy-ledger.sqlite``.
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
from typing import Iterable, Sequence

from seedtune.shared.accounting import PrivacyAccountant
from seedtune.shared.config import cache_root
from seedtune.shared.noise import Noise
from seedtune.shared.run_folder import PRIVACY_LEDGER_FILE

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    data_key TEXT NOT NULL, request TEXT NOT NULL, noise TEXT NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, reply BLOB NOT NULL, released_utc TEXT NOT NULL, PRIMARY KEY (data_key, request));
CREATE TABLE IF NOT EXISTS followed (
    holder TEXT NOT NULL, ledger TEXT NOT NULL, version INTEGER NOT NULL, head BLOB NOT NULL,
    followed_utc TEXT NOT NULL, PRIMARY KEY (holder, ledger));
"""
NON_PRIVATE = ""  # the noise column of a release without privacy: it spends an infinite epsilon


class BudgetExceeded(RuntimeError):
    """The release would take the data holder past its (epsilon, delta) budget."""


def default_path() -> Path:
    return Path(os.environ.get("SEEDTUNE_PRIVACY_LEDGER", cache_root() / PRIVACY_LEDGER_FILE))


def data_key(records: Iterable[tuple[Sequence[str], str]]) -> str:
    """SHA-256 of the holder's records in order, each its text fields and its label as the data spell them:
    which data a release used. Nothing a config chooses enters it (v1 hashed the task name, which a renamed
    task would have turned into a fresh budget for the same records)."""
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
    """The releases of every data set this node holds, in one SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def accountant(self, key: str) -> PrivacyAccountant:
        """The holder's releases of data set ``key``, in order, as a :class:`PrivacyAccountant`."""
        accountant = PrivacyAccountant()
        for noise, rate, steps in self._conn.execute(
                "SELECT noise, sample_rate, steps FROM releases WHERE data_key = ? ORDER BY rowid", (key,)):
            accountant.record(Noise.from_json(noise) if noise != NON_PRIVATE else None, rate, steps)
        return accountant

    def epsilon(self, key: str, delta: float, extra: Run | None = None) -> float:
        """The holder's epsilon at ``delta`` over every recorded release (plus ``extra`` steps, if given)."""
        accountant = self.accountant(key)
        return (accountant.after(*extra) if extra else accountant).epsilon(delta)

    def keys(self) -> list[str]:
        """The data sets (data keys) with releases in this ledger."""
        return [k for (k,) in self._conn.execute("SELECT DISTINCT data_key FROM releases ORDER BY data_key")]

    def steps(self, key: str) -> int:
        return int(self._conn.execute("SELECT COALESCE(SUM(steps), 0) FROM releases WHERE data_key = ?",
                                      (key,)).fetchone()[0])

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
            (holder, ledger, int(version), head, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))

    def reply_for(self, key: str, request: str) -> bytes | None:
        row = self._conn.execute("SELECT reply FROM releases WHERE data_key = ? AND request = ?",
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

    def record(self, key: str, request: str, run: Run, budget: Budget | None, reply: bytes) -> None:
        """Durably note the release and its reply bytes, re-checking the budget inside the transaction (another
        process may serve the same holder); raises :class:`BudgetExceeded` and records nothing if it no longer
        fits. Call before the reply is sent."""
        noise, rate, steps = run
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self.check(key, run, budget)
            self._conn.execute("INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (key, request, NON_PRIVATE if noise is None else noise.to_json(), float(rate),
                                int(steps), reply, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise


_LEDGERS: dict[Path, PrivacyLedger] = {}


def open_privacy_ledger(path: str | Path | None = None) -> PrivacyLedger:
    """One open ledger per file and process (a simulation actor serves many nodes)."""
    resolved = (Path(path) if path else default_path()).resolve()
    if resolved not in _LEDGERS:
        _LEDGERS[resolved] = PrivacyLedger(resolved)
        log.info("privacy ledger of this node's data holders: %s", resolved)
    return _LEDGERS[resolved]
