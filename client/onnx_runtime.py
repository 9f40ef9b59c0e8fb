"""A node that runs its forward passes on ONNX Runtime, with numpy only: no torch in the process.

An edge box with an inference runtime can then take part: a ZO step needs two forward passes per example at
seeded perturbations of the trainable entries, which here are just a numpy vector fed to the exported
graph (see :mod:`shared.task.onnx_format`). Directions come from the engine's numpy generator, and replay is
``values += float32(coeff) * z``, the same single rounding as the torch replica, so both reach bit-identical
trainable values from the same ledger (Rademacher directions only; Gaussian ones agree only to rounding).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from seedtune.shared.task.config import RunConfig, from_dict
from seedtune.shared.engine.directions import CHUNK, direction_numpy
from seedtune.shared.engine.follower import LedgerFollower, ReplicaError
from seedtune.shared.task.onnx_format import load_trainable
from seedtune.shared.task.onnx_task import DEFAULT_PROVIDERS, OnnxTask
from seedtune.shared.protocol.proto import LedgerHeader

log = logging.getLogger(__name__)


class OnnxView:
    """The trainable vector and the ZO step's moves on it (:class:`client.zo_step.ZoModel`), in numpy."""

    def __init__(self, task: OnnxTask, values: np.ndarray) -> None:
        self.task = task
        self.values = values.astype(np.float32, copy=True)
        self._saved: np.ndarray | None = None

    def _chunks(self, seed: int):
        for lo in range(0, self.values.size, CHUNK):
            n = min(CHUNK, self.values.size - lo)
            yield slice(lo, lo + n), direction_numpy(seed, lo, n)

    def snapshot(self) -> None:
        self._saved = self.values.copy()

    def perturb(self, seed: int, scale: float) -> None:
        if self._saved is None:
            raise RuntimeError("perturb() needs snapshot() first")
        for where, z in self._chunks(seed):
            self.values[where] = self._saved[where] + np.float32(scale) * z

    def restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("restore() needs snapshot() first")
        self.values[:] = self._saved
        self._saved = None

    def apply(self, seed: int, coeff: float) -> None:
        """values += float32(coeff) * z: z is +-1, so the product is exact and the sum rounds once, as in torch."""
        for where, z in self._chunks(seed):
            self.values[where] += np.float32(coeff) * z

    def apply_all(self, moves: Sequence[tuple[int, float]]) -> None:
        """Each move's ``apply`` in order (the values are one contiguous vector: nothing to gather)."""
        for seed, coeff in moves:
            self.apply(seed, coeff)

    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        return self.task.per_example_loss(ids, labels, self.values)


class OnnxReplica(LedgerFollower):
    """A ledger replica whose forward passes run on ONNX Runtime."""

    task: OnnxTask
    view: OnnxView

    def __init__(self, task: OnnxTask, config: RunConfig | None = None) -> None:
        meta = task.meta
        self.task, self.config = task, config  # type: ignore[assignment]  # None: an exported model's own settings
        self._base_values = load_trainable(task.trainable_path, meta)
        super().__init__(meta.base_model_digest, meta.trainable_digest, meta.trainable_size)
        self.view = OnnxView(task, self._base_values)

    @property
    def engine(self) -> str:
        return f"onnx:{self.task.provider}"

    @classmethod
    def from_header(cls, header: LedgerHeader, model_path: str | Path,
                    providers: Sequence[str] = DEFAULT_PROVIDERS) -> "OnnxReplica":
        config = from_dict(json.loads(header.config_json)).validate()
        task = OnnxTask(model_path, threads=config.threads, providers=providers)
        meta = task.meta
        if (meta.model, meta.max_length) != (config.model.name, config.model.max_length):
            raise ReplicaError(f"{model_path} was exported for model {meta.model!r} with max_length "
                               f"{meta.max_length}; the ledger trains {config.model.name!r} with max_length "
                               f"{config.model.max_length}")
        if meta.task != dataclasses.asdict(config.task):
            raise ReplicaError(f"{model_path} was exported for another task ({meta.task}); the ledger trains "
                               f"{dataclasses.asdict(config.task)}: export the ledger's model again")
        if header.direction != "rademacher":
            raise ReplicaError(f"the ledger uses {header.direction!r} directions; an ONNX Runtime node replays "
                               f"bit-exactly only Rademacher ones")
        replica = cls(task, config)
        replica.attach(header)
        log.info("ONNX Runtime replica of %s on %s: %d trainable entries", meta.model, task.provider,
                 meta.trainable_size)
        return replica

    def values(self) -> np.ndarray:
        return self.view.values.copy()

    def _set_values(self, values: np.ndarray) -> None:
        self.view.values[:] = values

    def _reset_values(self) -> None:
        self.view.values[:] = self._base_values

    def predictions(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self.task.predictions(ids, self.config.model.microbatch if self.config else 64, self.view.values)
