"""One batching module for the torch and ONNX Runtime paths (shared.engine.batching)."""

from __future__ import annotations

import numpy as np
import pytest

from seedtune.shared.engine.batching import keep_tail, length_sorted, pad


def test_length_sorted_batches_cover_every_row_once_shortest_first():
    ids = [[1] * n for n in (5, 2, 9, 2, 7, 1, 3)]
    batches = list(length_sorted(ids, 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(ids)))
    lengths = [len(ids[i]) for b in batches for i in b]
    assert lengths == sorted(lengths) and batches[0].tolist() == [5, 1, 3]  # stable: ties keep their order
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        list(length_sorted(ids, 0))


def test_pad_masks_the_padding_and_keep_tail_never_cuts_the_prompt_tail():
    input_ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert input_ids.dtype == mask.dtype == np.int64
    assert keep_tail([[1, 2, 3, 4, 5, 90, 91], [1, 90, 91]], 5, [90, 91]) == [[1, 2, 3, 90, 91], [1, 90, 91]]
