"""The direction generator as it was when ledgers were first written, kept as the reference the fast generator
in shared/engine/directions.py must reproduce bit for bit (ledgers depend on the stream): the 32-bit hash emulated on
int64 tensors, each word expanded into 32 int64 bits. Written without shared.engine.directions' torch code."""

from __future__ import annotations

import torch

from seedtune.shared.engine.directions import MASK32, _M1, _M2, _keys


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def words_reference(k0: int, k1: int, first: int, count: int) -> torch.Tensor:
    """Hashed words as int64 values in [0, 2**32)."""
    j = torch.arange(first, first + count, dtype=torch.int64) & MASK32
    return _hash32(_hash32(j ^ k0) ^ k1)


def rademacher_reference(seed: int, start: int, count: int) -> torch.Tensor:
    k0, k1 = _keys(seed)
    first, last = start >> 5, (start + count - 1) >> 5
    words = words_reference(k0, k1, first, last - first + 1)
    shifts = torch.arange(32, dtype=torch.int64)
    bits = ((words.unsqueeze(1) >> shifts) & 1).reshape(-1)
    offset = start - (first << 5)
    return (1 - 2 * bits[offset : offset + count]).to(torch.float32)
