"""The direction generator as it was when ledgers were first written (bit expansion in int64), kept as the
reference the fast generator in shared/directions.py must reproduce bit for bit: ledgers depend on the stream."""

from __future__ import annotations

import torch

from shared.directions import _keys, _words_torch


def rademacher_reference(seed: int, start: int, count: int) -> torch.Tensor:
    k0, k1 = _keys(seed)
    first, last = start >> 5, (start + count - 1) >> 5
    words = _words_torch(k0, k1, first, last - first + 1, torch.device("cpu"))
    shifts = torch.arange(32, dtype=torch.int64)
    bits = ((words.unsqueeze(1) >> shifts) & 1).reshape(-1)
    offset = start - (first << 5)
    return (1 - 2 * bits[offset : offset + count]).to(torch.float32)
