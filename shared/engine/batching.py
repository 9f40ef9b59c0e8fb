"""Tokenised examples to model inputs, one way for every runtime (torch and ONNX Runtime): truncation that keeps
a prompt's tail, padding with an attention mask, and length-sorted batches.

Scoring in batches of similar length pads less and gives the same per-example values (each row's padding is
masked), so every path that scores many examples (the ZO step, evaluation, the ONNX node) batches through
:func:`length_sorted` and writes each batch's results back at its rows.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def keep_tail(ids: Sequence[Sequence[int]], max_length: int, tail: Sequence[int]) -> list[list[int]]:
    """Cut each sequence to ``max_length`` tokens by dropping from the middle, never the prompt's ``tail``
    (the tokens after the text that a decoder's label words follow)."""
    tail = list(tail)
    return [list(x) if len(x) <= max_length else list(x[: max_length - len(tail)]) + tail for x in ids]


def pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, attention mask), both int64 of shape (rows, longest row); padding on the right."""
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return input_ids, mask


def length_sorted(ids: Sequence[Sequence[int]], size: int) -> Iterator[np.ndarray]:
    """Row indices in batches of ``size``, shortest rows first (a stable sort: ties keep their order)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), size):
        yield order[start : start + size]
