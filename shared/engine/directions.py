"""Seeded perturbation directions, regenerated on demand and never stored.

A direction z is a function of a public 64-bit seed and of an element's position in the flat vector of
trainable entries. It is produced by a counter-based hash (no generator state), so any slice
``[start, start + count)`` can be generated on its own: chunked generation keeps peak extra memory small
and any node (torch or numpy, CPU or GPU, any process) regenerates exactly the same values.

The hash is Chris Wellons' ``lowbias32`` applied twice with seed-derived keys, on 32-bit words: native
wrapping uint32 arithmetic in numpy; in torch, int32 tensors holding the same bit patterns (two's-complement
multiplication wraps exactly like uint32, and each right shift is masked so that it acts as a logical shift).
The two are written independently on purpose: the tests compare them bit for bit, and both against the original
int64 emulation (tests/reference_directions.py), on which the ledgers were first written.

Rademacher (+1/-1, the default): word j holds the signs of entries 32j .. 32j+31, bit i of the word for entry
32j + i. Its four bytes, lowest first, index a 256 x 8 table of signs already multiplied by the caller's scale,
so one gather writes ``scale * z`` in the output dtype (exact: the scale times +-1). ``theta + c * z`` then
rounds once, identically on every IEEE-754 machine, which makes ledger replay bit-exact. Hashing costs one
word per 32 entries; the gather is the only full-size pass.

Gaussian: the standard normal quantised to 65,536 equally likely levels. Word j of its own stream gives
entries 2j (low 16 bits) and 2j+1 (high 16 bits); a 16-bit value k selects level k, the normal quantile at the
cell midpoint (k + 0.5) / 65536 (``statistics.NormalDist.inv_cdf``, mirrored so that the levels are exactly
symmetric), all levels scaled so that their variance is 1. A table lookup is exact, so torch and numpy give the
same bits; the levels are computed once per process in float64 and rounded to the dtype, so two machines whose
``log`` differ in the last float64 place could in principle round one level differently (tested equal here).
Mean 0 and variance 1 exactly over the levels, kurtosis 2.9996 (a normal's is 3); tails stop at 4.33. This
replaced Box-Muller on float64 uniforms (ledger format 4), which ran 30 to 100 times slower and matched
between torch and numpy only to float32 rounding.

Hadamard (an orthogonal frame): the low 32 bits of the seed pick a row k of the Sylvester-Hadamard matrix,
``H[k, j] = (-1)^popcount(k & j)``, and the high 32 bits a Rademacher sign per entry (the Rademacher direction
of seed >> 32), so ``z[j] = r[j] * H[k, j]``, entries +-1 like Rademacher. For any n = 2^m at least the
number of trainable entries d, the n directions sharing one sign key form a tight frame:
``sum_k z_k z_k^T = n I`` exactly (rows of H are orthogonal, and the signs cancel in pairs). Their K = n
projections of a gradient g therefore hold g itself (``||Z^T g|| = sqrt(n) ||g||``), and a ZO step over them is
DP-SGD on those entries: what a head stage uses (:func:`step_seeds`). With K < n rows the random signs keep
``E[z z^T] = I``, like the other kinds.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: the numpy path (the ONNX Runtime client) runs without it
    import torch

DirectionKind = Literal["rademacher", "gaussian", "hadamard"]
DIRECTION_KINDS: tuple[DirectionKind, ...] = ("rademacher", "gaussian", "hadamard")

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GAUSS_STREAM = 0x5BD1E995  # separates the Gaussian stream's words from the sign stream's
CHUNK = 1 << 20  # elements generated at a time: 4 MiB of float32 plus small integer scratch
SCRATCH_EXTRA = 64  # a caller's scratch buffer holds count + this many entries (whole words either side)
LEVELS = 1 << 16  # Gaussian quantisation levels (16 bits of a word per entry)


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


def _normal_levels() -> np.ndarray:
    """The Gaussian kind's 65,536 levels in float64: midpoint quantiles, exactly symmetric, unit variance."""
    normal = statistics.NormalDist()
    lower = np.array([normal.inv_cdf((k + 0.5) / LEVELS) for k in range(LEVELS // 2)])
    levels = np.concatenate([lower, -lower[::-1]])
    return levels / math.sqrt(math.fsum(levels * levels) / LEVELS)


_LEVELS64: np.ndarray | None = None


def normal_levels() -> np.ndarray:
    """The Gaussian kind's levels (float64, computed once per process)."""
    global _LEVELS64
    if _LEVELS64 is None:
        _LEVELS64 = _normal_levels()
    return _LEVELS64


def _signed32(x: int) -> int:
    """The int32 holding the same 32 bits as the uint32 x."""
    return x - (1 << 32) if x >= 1 << 31 else x


# ----------------------------------------------------------------------------------------------- torch
def _hash32_torch(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int32 tensor (uint32 bit patterns), in place."""
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_M1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_signed32(_M2))
    return x.bitwise_xor_((x >> 16) & 0xFFFF)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counter(count: int, device: torch.device) -> torch.Tensor:
    """0, 1, ..., count - 1 as int32 on ``device``, sliced from one cached range (arange is slow on int32)."""
    import torch

    have = _COUNTERS.get(device)
    if have is None or have.numel() < count:
        have = _COUNTERS[device] = torch.arange(max(count, CHUNK // 2 + SCRATCH_EXTRA), dtype=torch.int32,
                                                device=device)
    return have[:count]


def words_torch(k0: int, k1: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """Hashed words ``first .. first + count - 1`` of the stream keyed (k0, k1), as int32 bit patterns."""
    j = _counter(count, device) + _signed32(first & MASK32)  # word indices mod 2**32, as int32 (wraps)
    j = _hash32_torch(j.bitwise_xor_(_signed32(k0)))
    return _hash32_torch(j.bitwise_xor_(_signed32(k1)))


def _parity_torch(x: torch.Tensor) -> torch.Tensor:
    """popcount(x) mod 2 of an int32 tensor's 32 bits, in place (folding halves: the arithmetic shifts' sign
    bits reach only bits that the next folds ignore)."""
    for shift in (16, 8, 4, 2, 1):
        x.bitwise_xor_(x >> shift)
    return x.bitwise_and_(1)


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dimension (a power of two, n): entry k becomes sum_j (-1)^popcount(k & j) x[j], the
    projections of x onto the n Hadamard rows at once, in n log n additions. Each vector of the leading dimensions
    is transformed alone, by the same fixed sequence of additions, so its bits do not depend on the others."""
    import torch

    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"a Walsh-Hadamard transform needs a power-of-two length, got {n}")
    out = x.reshape(-1, n).clone()
    h = 1
    while h < n:  # butterflies in place: (a, b) -> (a + b, a - b) for entries h apart
        pairs = out.view(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        difference = a - b
        a.add_(b)
        b.copy_(difference)
        h *= 2
    return out.view(x.shape)


def transform_length(last_row: int, entries: int) -> int:
    """The power of two a Walsh-Hadamard transform needs to cover Hadamard rows up to ``last_row`` and a
    trainable set of ``entries``."""
    return 1 << max(last_row, entries - 1, 0).bit_length()


_TABLES: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def _table(name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``signs`` (256, 8): row b holds 1 - 2 * bit i of b for i = 0..7; ``levels`` (65536,): the Gaussian
    levels; in ``dtype`` on ``device``, built once."""
    import torch

    key = (name, dtype, device)
    if key not in _TABLES:
        if name == "signs":
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            _TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=device)
        else:
            _TABLES[key] = torch.from_numpy(normal_levels()).to(dtype=dtype, device=device)
    return _TABLES[key]


def _output(count: int, dtype: torch.dtype, device: torch.device, scratch: torch.Tensor | None) -> torch.Tensor:
    import torch

    if scratch is None:
        return torch.empty(count, dtype=dtype, device=device)
    if scratch.dtype != dtype or scratch.device != device or scratch.dim() != 1 or not scratch.is_contiguous() \
            or scratch.numel() < count:
        raise ValueError(f"scratch must be a contiguous 1-D {dtype} tensor on {device} with at least {count} "
                         f"entries, got {scratch.dtype} {tuple(scratch.shape)} on {scratch.device}")
    return scratch[:count]


def direction_torch(
    seed: int,
    start: int,
    count: int,
    kind: DirectionKind = "rademacher",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    *,
    scale: float = 1.0,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale`` times entries ``[start, start + count)`` of the direction for ``seed`` (float32 by default).

    With ``scratch`` (a contiguous 1-D tensor of the dtype and device, at least ``count + SCRATCH_EXTRA``
    entries) the result is a view into it and nothing is allocated at full size: how a caller that
    generates chunk after chunk avoids touching fresh memory for each. ``scale * z`` is rounded once to the
    dtype (exactly ``+-scale`` for Rademacher)."""
    import torch

    dtype = dtype or torch.float32
    device = torch.device(device)
    _check_seed(seed)
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"unknown direction kind {kind!r}; choose one of {DIRECTION_KINDS}")
    if count <= 0:
        return torch.empty(0, dtype=dtype, device=device)
    if count > CHUNK:  # piece by piece through one chunk-sized scratch: no full-size integer temporaries
        out = _output(count, dtype, device, scratch)
        piece = torch.empty(CHUNK + SCRATCH_EXTRA, dtype=dtype, device=device)
        for lo in range(0, count, CHUNK):
            n = min(CHUNK, count - lo)
            out[lo : lo + n] = direction_torch(seed, start + lo, n, kind, dtype, device, scale=scale, scratch=piece)
        return out
    if kind == "rademacher":
        k0, k1 = _keys(seed)
        first, last = start >> 5, (start + count - 1) >> 5
        words = words_torch(k0, k1, first, last - first + 1, device)
        # Each word's 4 bytes, lowest first (bit i of a byte -> entry i): the same bit order as shifting the
        # word right by 0..31, computed with shifts rather than a byte view so that it holds on any endianness.
        shifts = torch.tensor((0, 8, 16, 24), dtype=torch.int32, device=device)
        octets = ((words.unsqueeze(1) >> shifts) & 0xFF).reshape(-1)
        table = _table("signs", dtype, device)
        table = table if scale == 1.0 else table * scale
        out = _output(octets.numel() * 8, dtype, device, scratch)
        torch.index_select(table, 0, octets, out=out.view(-1, 8))
        offset = start - (first << 5)
        return out[offset : offset + count]
    if kind == "hadamard":  # the sign key's Rademacher direction times row k of H (exact: +-scale times +-1)
        out = direction_torch(seed >> 32, start, count, "rademacher", dtype, device, scale=scale, scratch=scratch)
        j = _counter(count, device) + _signed32(start & MASK32)
        return out.mul_(_parity_torch(j.bitwise_and_(_signed32(seed & MASK32))).mul_(-2).add_(1).to(dtype))
    # Gaussian: entries 2j and 2j + 1 are the low and high 16 bits of word j, each picking one level
    k0, k1 = _keys(seed, _GAUSS_STREAM)
    first, last = start >> 1, (start + count - 1) >> 1
    words = words_torch(k0, k1, first, last - first + 1, device)
    halves = torch.stack((words & 0xFFFF, (words >> 16) & 0xFFFF), dim=1).reshape(-1)
    out = _output(halves.numel(), dtype, device, scratch)
    torch.index_select(_table("levels", dtype, device), 0, halves, out=out)
    if scale != 1.0:
        out.mul_(scale)
    offset = start - (first << 1)
    return out[offset : offset + count]


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


_NP_LEVELS: dict[type, np.ndarray] = {}


def _np_levels(dtype: type) -> np.ndarray:
    key = np.dtype(dtype).type
    if key not in _NP_LEVELS:
        _NP_LEVELS[key] = normal_levels().astype(dtype)
    return _NP_LEVELS[key]


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
        return (1 - 2 * bits).astype(dtype)  # measured faster in numpy than a table lookup
    if kind == "gaussian":
        first, last = start >> 1, (start + count - 1) >> 1
        words = _words_np(*_keys(seed, _GAUSS_STREAM), first, last - first + 1)
        halves = np.stack((words & np.uint32(0xFFFF), words >> np.uint32(16)), axis=1).reshape(-1)
        offset = start - (first << 1)
        return _np_levels(dtype)[halves][offset : offset + count]
    if kind == "hadamard":
        j = (np.arange(start, start + count, dtype=np.uint64) & np.uint64(MASK32)).astype(np.uint32)
        x = j & np.uint32(_check_seed(seed) & MASK32)
        for shift in (16, 8, 4, 2, 1):
            x = x ^ (x >> np.uint32(shift))
        signs: np.ndarray = (1 - 2 * (x & np.uint32(1)).astype(np.int8)).astype(dtype)
        return direction_numpy(seed >> 32, start, count, "rademacher", dtype) * signs
    raise ValueError(f"unknown direction kind {kind!r}; choose one of {DIRECTION_KINDS}")


FRAME_MAX = 4096  # zo.directions' bound: the largest full frame a step draws


def frame_size(entries: int) -> int:
    """K of a full Hadamard frame over ``entries`` trainable entries: the power of two at or above it."""
    k = transform_length(0, entries)
    if k > FRAME_MAX:
        raise ValueError(f"a full Hadamard frame over {entries:,} trainable entries needs {k:,} directions per step, "
                         f"more than zo.directions' {FRAME_MAX:,}: choose a smaller trainable set (selection.mode = "
                         f"'head') or set zo.directions")
    return k


def step_seeds(kind: str, seeds: Iterator[int], count: int) -> list[int]:
    """The ``count`` direction seeds of one step, drawn from ``seeds``: one seed each for Rademacher and
    Gaussian directions; for Hadamard, rows 0 .. count - 1 under one fresh sign key (the high 32 bits of one
    draw), so that ``count`` = n >= the trainable size gives the tight frame (one draw per step)."""
    if kind != "hadamard":
        return [next(seeds) for _ in range(count)]
    if count > 1 << 32:
        raise ValueError(f"a Hadamard step has at most 2**32 directions, got {count}")
    key = next(seeds) >> 32
    return [(key << 32) | row for row in range(count)]


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
