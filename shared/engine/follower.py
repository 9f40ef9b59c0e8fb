"""Following a ledger: the bookkeeping every replica shares, whatever engine holds its weights.

A replica moves only by applying chain-verified entries, one ``theta += coeff * z(seed)`` each, to its
trainable entries. This class keeps the position (version, chain hash) and checks every tail against it;
subclasses say where the weights live (:class:`shared.engine.replica.Replica`: a torch model;
:class:`client.onnx_runtime.OnnxReplica`: a numpy vector fed to ONNX Runtime). It imports no torch.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from seedtune.shared.protocol.chain import ChainError, Entry, genesis, link, unpack_tail
from seedtune.shared.task.config import RunConfig
from seedtune.shared.protocol.digest import state_digest
from seedtune.shared.protocol.proto import LedgerHeader, LedgerTail
from seedtune.shared.task.tasks import Split


class Tokenizes(Protocol):
    """A replica's task model as far as loading data needs it."""

    name: str

    def examples(self, split: Split) -> tuple[list[list[int]], np.ndarray]: ...


class ReplicaError(RuntimeError):
    """The local base model or trainable set is not the one the ledger was made for, or the replica cannot
    reach the requested version from where it is."""


class ZoModel(Protocol):
    """What a ZO step needs of a model, and a replica of its view: seeded moves of its trainable entries and
    per-example losses (client.zo_step)."""

    def snapshot(self) -> None:
        """Remember the current trainable values; perturb and restore work from them."""

    def perturb(self, seed: int, scale: float) -> None:
        """Trainable values := snapshot + scale * z(seed)."""

    def restore(self) -> None:
        """Back to the snapshot, exactly."""

    def apply(self, seed: int, coeff: float) -> None:
        """theta += coeff * z(seed)."""

    def apply_all(self, moves: Sequence[tuple[int, float]]) -> None:
        """theta += coeff * z(seed) on the trainable entries for each (seed, coeff), in order."""

    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        """Cross-entropy of each example at the current trainable values (float32)."""



class LedgerFollower:
    config: RunConfig  # the run configuration pinned in the ledger header
    view: ZoModel
    task: Tokenizes  # the task model: torch's TextClassifier, ONNX Runtime's OnnxTask

    def __init__(self, base_digest: str, trainable_digest: str, size: int) -> None:
        self.base_digest, self.trainable_digest, self.size = base_digest, trainable_digest, size
        self.version = 0
        self.head = b""  # chain hash at `version`; set by attach()
        self.header: LedgerHeader | None = None

    # ---------------------------------------------------------------------- where the weights live
    @property
    def engine(self) -> str:
        """What runs this replica's forward passes, e.g. ``torch:cuda:0:bfloat16`` or
        ``onnx:CPUExecutionProvider``: a node reports it in ``Reply.runtime``, the run summary lists it."""
        raise NotImplementedError

    def values(self) -> np.ndarray:
        """The trainable entries as one float32 vector (what a node keeps between rounds)."""
        raise NotImplementedError

    def _set_values(self, values: np.ndarray) -> None:
        raise NotImplementedError

    def predictions(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Predicted labels of tokenized examples at this position (a node scoring its own held-out data)."""
        raise NotImplementedError

    def _reset_values(self) -> None:
        """Back to the base model's trainable values."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- position
    def attach(self, header: LedgerHeader) -> None:
        """Bind to a ledger after checking that its base model and trainable set are ours; resets to version 0."""
        if header.base_model_digest != self.base_digest:
            raise ReplicaError(f"base model digest {self.base_digest[:16]} differs from the ledger's "
                               f"{header.base_model_digest[:16]}: a different model or version of it")
        if header.trainable_digest != self.trainable_digest:
            raise ReplicaError(f"trainable set digest {self.trainable_digest[:16]} differs from the ledger's "
                               f"{header.trainable_digest[:16]}")
        self.header = header
        self.reset()

    def reset(self) -> None:
        """Back to the base weights (version 0)."""
        if self.header is None:
            raise ReplicaError("no ledger attached: attach(header) first")
        self._reset_values()
        self.version, self.head = 0, genesis(self.header)

    def load_values(self, values: np.ndarray, version: int, head: bytes) -> None:
        if values.shape != (self.size,) or values.dtype != np.float32:
            raise ReplicaError(f"stored trainable values have shape {values.shape} and dtype {values.dtype}; "
                               f"expected ({self.size},) float32")
        self._set_values(values)
        self.version, self.head = version, head

    def state_digest(self) -> str:
        """The model's identity at this position, equal on torch and ONNX Runtime replicas."""
        return state_digest(self.base_digest, self.trainable_digest, self.version, self.head, self.values())

    # ---------------------------------------------------------------------------------------- replay
    def apply(self, entries: list[Entry], head: bytes) -> None:
        """Apply entries that start at our version, checking they chain from our head to ``head``."""
        if entries and entries[0].index != self.version:
            raise ReplicaError(f"entries start at index {entries[0].index}, the replica is at version {self.version}")
        h = self.head
        for e in entries:
            h = link(h, e)
        if h != head:
            raise ChainError(f"entries {self.version}..{self.version + len(entries)} do not chain to the expected head")
        self._advance(entries, head)

    def _advance(self, entries: list[Entry], head: bytes) -> None:
        """The replay loop proper, for entries already checked to chain from our head to ``head``."""
        self.view.apply_all([(e.seed, e.coeff) for e in entries])
        self.version += len(entries)
        self.head = head

    def catch_up(self, tail: LedgerTail) -> int:
        """Apply a ledger tail; a tail starting before our version is fine if it agrees with our history.
        Returns the number of entries applied."""
        entries = list(unpack_tail(tail))  # verifies prev_hash -> head_hash
        if tail.start_index > self.version:
            raise ReplicaError(f"the ledger tail starts at {tail.start_index} but this replica is at version "
                               f"{self.version}; it needs the entries from {self.version}")
        skip = self.version - tail.start_index
        if skip > len(entries):
            raise ReplicaError(f"this replica is at version {self.version}, ahead of the ledger's "
                               f"{tail.start_index + len(entries)}")
        h = tail.prev_hash
        for e in entries[:skip]:
            h = link(h, e)
        if h != self.head:
            raise ChainError(f"the ledger's history up to version {self.version} differs from this replica's")
        # unpack_tail checked prev_hash -> head_hash, and the prefix reaches our head: the rest chains on.
        self._advance(entries[skip:], tail.head_hash)
        return len(entries) - skip
