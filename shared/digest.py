"""Content digests of weights: the base model's identity in a ledger header, and bit-exactness checks."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and persistent buffer (names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_digest(tensor).encode())
    return h.hexdigest()
