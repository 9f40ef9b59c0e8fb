"""Content digests: the base model's and trainable set's identity in a ledger header, and bit-exactness checks.

The trainable-set and replica-state digests are computed from numpy arrays so that a node without torch (the
ONNX Runtime client) derives exactly the same strings as a torch node.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


def tensor_digest(tensor: torch.Tensor) -> str:
    import torch

    t = tensor.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and persistent buffer (names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_digest(tensor).encode())
    return h.hexdigest()


def selection_digest(names: Sequence[str], shapes: Sequence[tuple[int, ...]],
                     indices: Sequence[np.ndarray | None]) -> str:
    """Identity of a trainable set: parameter names, shapes and selected flat indices, in order."""
    h = hashlib.sha256()
    for name, shape, idx in zip(names, shapes, indices):
        h.update(f"{name}:{tuple(int(d) for d in shape)}:".encode())
        h.update(b"all" if idx is None else np.asarray(idx, dtype=np.int64).tobytes())
    return h.hexdigest()


def state_digest(base_digest: str, trainable_digest: str, version: int, head: bytes, values: np.ndarray) -> str:
    """Identity of a replica's state: with the base weights pinned by ``base_digest``, the trainable values
    determine the whole model, so torch and ONNX Runtime nodes can compare models without sharing weights."""
    h = hashlib.sha256(f"{base_digest}:{trainable_digest}:{version}:".encode() + head)
    h.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return h.hexdigest()
