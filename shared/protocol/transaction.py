"""One SQLite write transaction, taken at once: what the ledger and a holder's privacy ledger write in."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock now, so no other writer slips in between this block's reads and its
    writes), committed when the block ends, rolled back if it raises. The connection must be in autocommit
    mode (``isolation_level=None``), as every seedtune connection is."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
