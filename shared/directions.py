"""Seeded perturbation directions, regenerated on demand and never stored.

A direction z is a function of a public 64-bit seed and of an element's position in the flat vector of
trainable entries. It is produced by a counter-based hash (no generator state), so any slice
``[start, start + count)`` can be generated on its own: chunked generation keeps peak extra memory small
and any node (torch or numpy, CPU or GPU, any process) regenerates exactly the same values.

The hash is Chris Wellons' ``lowbias32`` applied twice with seed-derived keys. The torch version works
on int64 tensors holding 32-bit values (torch has no wrapping uint32 multiply), splitting each multiply so
that no intermediate overflows; the numpy version uses native wrapping uint32 arithmetic. The two are
written independently on purpose: the tests compare them bit for bit.

Rademacher signs are expanded from each word's four bytes through a 256 x 8 table of signs (bit i of a byte is
entry i), the same bit order as shifting the word by 0..31: measured in one process at 4M entries on 2 threads,
430 M entries/s in torch against 76 M/s for the int64 bit expansion it replaced (kept in
tests/reference_directions.py, against which the stream is tested bit for bit).

Rademacher (+1/-1) directions are the default because ``theta + c * z`` then rounds once, identically on
every IEEE-754 machine, which makes ledger replay bit-exact. Gaussian directions are offered for
comparison; their values agree across implementations only to float32 rounding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: the numpy path (the ONNX Runtime client) runs without it
    import torch

DirectionKind = Literal["rademacher", "gaussian"]
DIRECTION_KINDS: tuple[str, ...] = ("rademacher", "gaussian")

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GAUSS_STREAM = 0x5BD1E995  # separates the two uniform streams of Box-Muller from the sign stream
CHUNK = 1 << 20  # elements generated at a time: 4 MiB of float32 plus small integer scratch


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"direction seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _hash32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def _keys(seed: int, stream: int = 0) -> tuple[int, int]:
    seed = _check_seed(seed)
    k0 = _hash32_int((seed & MASK32) ^ stream)
    k1 = _hash32_int(((seed >> 32) ^ 0x9E3779B9 ^ _hash32_int(stream)) & MASK32)
    return k0, k1


# ----------------------------------------------------------------------------------------------- torch
def _mul32_torch(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _hash32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32_torch(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32_torch(x, _M2)
    return x ^ (x >> 16)


def _words_torch(k0: int, k1: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    import torch

    j = torch.arange(first, first + count, dtype=torch.int64, device=device) & MASK32
    return _hash32_torch(_hash32_torch(j ^ k0) ^ k1)


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row b holds 1 - 2 * bit i of b for i = 0..7, in ``dtype`` on ``device`` (built once)."""
    import torch

    key = (dtype, device)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=device)
    return _SIGN_TABLES[key]


def direction_torch(
    seed: int,
    start: int,
    count: int,
    kind: DirectionKind = "rademacher",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Entries ``[start, start + count)`` of the direction for ``seed`` as a torch tensor (float32 by default)."""
    import torch

    dtype = dtype or torch.float32
    device = torch.device(device)
    if count <= 0:
        return torch.empty(0, dtype=dtype, device=device)
    if kind == "rademacher":
        k0, k1 = _keys(seed)
        first, last = start >> 5, (start + count - 1) >> 5
        words = _words_torch(k0, k1, first, last - first + 1, device)
        # Each 32-bit word's 4 bytes, lowest first, index a table of their 8 signs (bit i of a byte -> entry i):
        # the same bit order as shifting the word right by 0..31, without 32 int64 operations per entry.
        shifts = torch.tensor((0, 8, 16, 24), dtype=torch.int64, device=device)
        octets = ((words.unsqueeze(1) >> shifts) & 0xFF).reshape(-1)
        signs = _sign_table(dtype, device)[octets].reshape(-1)
        offset = start - (first << 5)
        return signs[offset : offset + count]
    if kind == "gaussian":
        u1, u2 = (
            (_words_torch(*_keys(seed, _GAUSS_STREAM + s), start, count, device).to(torch.float64) + 0.5)
            * 2.0**-32
            for s in (0, 1)
        )
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)
    raise ValueError(f"unknown direction kind {kind!r}; choose one of {DIRECTION_KINDS}")


# ----------------------------------------------------------------------------------------------- numpy
def _hash32_np(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(_M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(_M2)
    return x ^ (x >> np.uint32(16))


def _words_np(k0: int, k1: int, first: int, count: int) -> np.ndarray:
    j = (np.arange(first, first + count, dtype=np.uint64) & np.uint64(MASK32)).astype(np.uint32)
    return _hash32_np(_hash32_np(j ^ np.uint32(k0)) ^ np.uint32(k1))


def direction_numpy(
    seed: int, start: int, count: int, kind: DirectionKind = "rademacher", dtype: type = np.float32
) -> np.ndarray:
    """Entries ``[start, start + count)`` of the direction for ``seed``, with numpy only (no torch)."""
    if count <= 0:
        return np.empty(0, dtype=dtype)
    if kind == "rademacher":
        k0, k1 = _keys(seed)
        first, last = start >> 5, (start + count - 1) >> 5
        words = _words_np(k0, k1, first, last - first + 1)
        bits = ((words[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).reshape(-1)
        offset = start - (first << 5)
        bits = bits[offset : offset + count].astype(np.int8)
        return (1 - 2 * bits).astype(dtype)
    if kind == "gaussian":
        u1, u2 = (
            (_words_np(*_keys(seed, _GAUSS_STREAM + s), start, count).astype(np.float64) + 0.5) * 2.0**-32
            for s in (0, 1)
        )
        return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)).astype(dtype)
    raise ValueError(f"unknown direction kind {kind!r}; choose one of {DIRECTION_KINDS}")


def seed_stream(base: int) -> Iterator[int]:
    """A reproducible sequence of public 64-bit direction seeds (splitmix64 of base + t).

    Direction seeds are public, so a fixed stream costs no privacy; it lets two runs that differ only in
    their noise use the same directions. The noise and the batches still come from the CSPRNG."""
    mask = (1 << 64) - 1
    state = base & mask
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)
