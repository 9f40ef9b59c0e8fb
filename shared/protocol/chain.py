"""The ledger's hash chain, computed identically by the server's store, replay and every client.

``h_0 = SHA-256(serialized LedgerHeader)`` and ``h_{i+1} = SHA-256(h_i || pack(i, seed, coeff, round))``
with a fixed little-endian packing (``<QQfI``), so the chain does not depend on how a protobuf library
chooses to serialise. Changing, dropping, reordering or inserting any entry changes every later hash.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from seedtune.shared.protocol.proto import LedgerHeader, LedgerTail

_ENTRY = struct.Struct("<QQfI")


class ChainError(ValueError):
    """An entry sequence does not hash to the expected value: tampered, truncated or from another ledger."""


@dataclass(frozen=True)
class Entry:
    index: int
    seed: int
    coeff: float  # a float32 value: -lr times the round's aggregate for this seed (shared.protocol.aggregation)
    round: int


def genesis(header: LedgerHeader) -> bytes:
    return hashlib.sha256(header.SerializeToString(deterministic=True)).digest()


def header_digest(header: LedgerHeader) -> str:
    return genesis(header).hex()


def link(prev: bytes, entry: Entry) -> bytes:
    packed = _ENTRY.pack(entry.index, entry.seed, float(np.float32(entry.coeff)), entry.round)
    return hashlib.sha256(prev + packed).digest()


def chain(prev: bytes, entries: Iterable[Entry]) -> bytes:
    for entry in entries:
        prev = link(prev, entry)
    return prev


def pack_tail(entries: list[Entry], prev_hash: bytes, head_hash: bytes, start_index: int) -> LedgerTail:
    """Column form for the wire: the coefficients go out as float32, exactly as stored."""
    return LedgerTail(
        start_index=start_index,
        prev_hash=prev_hash,
        seeds=[e.seed for e in entries],
        coeffs=[e.coeff for e in entries],
        rounds=[e.round for e in entries],
        head_hash=head_hash,
    )


def hash_along(tail: LedgerTail, version: int) -> bytes | None:
    """The chain hash after ``version`` entries along ``tail`` (whose own hashes the caller has checked), or
    None if the tail does not reach back to, or forward to, that version."""
    offset = version - tail.start_index
    if not 0 <= offset <= len(tail.seeds):
        return None
    return chain(tail.prev_hash, (Entry(tail.start_index + i, tail.seeds[i], tail.coeffs[i], tail.rounds[i])
                                  for i in range(offset)))


def unpack_tail(tail: LedgerTail) -> Iterator[Entry]:
    """Entries of a tail after checking its columns line up and that it hashes from prev_hash to head_hash."""
    n = len(tail.seeds)
    if not (len(tail.coeffs) == len(tail.rounds) == n):
        raise ChainError(f"ledger tail columns differ in length: {n} seeds, {len(tail.coeffs)} coeffs, "
                         f"{len(tail.rounds)} rounds")
    entries = [Entry(tail.start_index + i, s, c, r)
               for i, (s, c, r) in enumerate(zip(tail.seeds, tail.coeffs, tail.rounds))]
    bad = [e.index for e in entries if not np.isfinite(e.coeff)]
    if bad:
        raise ChainError(f"ledger tail has non-finite coefficients at indices {bad[:5]}")
    if chain(tail.prev_hash, entries) != tail.head_hash:
        raise ChainError(f"ledger tail from index {tail.start_index} ({n} entries) does not hash to its head "
                         f"{tail.head_hash.hex()[:16]}: corrupted or tampered in transit")
    return iter(entries)
