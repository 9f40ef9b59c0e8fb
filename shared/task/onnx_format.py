"""The exported ONNX model and its sidecar files: what ``seedtune export-onnx`` writes and an ONNX Runtime
node reads (no torch on the reading side).

``model.onnx`` takes ``input_ids`` and ``attention_mask`` (int64, batch x length, right-padded) and
``trainable``: the flat float32 vector of the trainable entries, in the trainable set's order, so a
perturbed forward pass feeds only that small vector; every other weight is a constant of the graph.
``trainable`` also has a default (an initializer of the same name): the finetuned values at export time, so
the file runs on its own with just the two token inputs. Beside it:

* ``model.seedtune.json``: model kind, tokenisation settings, the digests a ledger header pins (base model,
  trainable set), the ledger position exported, and the file's own SHA-256;
* ``model.trainable.npz``: the trainable set (flat indices per parameter) and the base model's trainable
  values, so a node can start from version 0 of any ledger over the same base model;
* ``model.tokenizer.json``: the tokenizer (Hugging Face ``tokenizers`` format).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from seedtune.shared.protocol.digest import selection_digest
from seedtune.shared.engine.follower import ReplicaError

FORMAT_VERSION = 2  # 2: the whole task (1: SST-2's prompt only)
INPUTS = ("input_ids", "attention_mask", "trainable")


class OnnxModelError(ReplicaError):
    """An exported model is missing, incomplete, altered, or not the one a ledger was made for (a node replies
    with a refusal naming the problem, as for any replica that cannot follow the ledger)."""


def sidecars(model_path: str | Path) -> tuple[Path, Path, Path]:
    """Paths of (metadata, trainable set, tokenizer) beside ``model_path``."""
    p = Path(model_path)
    stem = p.with_suffix("")
    return (stem.with_name(stem.name + ".seedtune.json"), stem.with_name(stem.name + ".trainable.npz"),
            stem.with_name(stem.name + ".tokenizer.json"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class OnnxMetadata:
    model: str  # the config's model name (packaged name, hub id or folder)
    kind: str  # "encoder" or "decoder"
    max_length: int
    pad_token_id: int
    task: dict  # the task (shared.task.config.TaskConfig as a dict): fields, template, labels in the logits' order
    direction: str
    base_model_digest: str
    trainable_digest: str
    trainable_size: int
    param_names: list[str]
    param_shapes: list[list[int]]
    ledger_version: int  # the position whose trainable values are the graph's default
    ledger_head: str  # hex
    state_digest: str  # of that position (shared.protocol.digest.state_digest)
    onnx_sha256: str
    opset: int
    format_version: int = FORMAT_VERSION

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> "OnnxMetadata":
        if not path.is_file():
            raise OnnxModelError(f"{path} is missing: export the model with `seedtune export-onnx`")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise OnnxModelError(f"{path} has format version {data.get('format_version')!r}; this seedtune reads "
                                 f"version {FORMAT_VERSION}: export the model again")
        return cls(**data)


def save_trainable(path: Path, indices: list[np.ndarray | None], base_values: np.ndarray) -> None:
    arrays = {f"idx_{i}": idx.astype(np.int64) for i, idx in enumerate(indices) if idx is not None}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, base_values=base_values.astype(np.float32), **cast(dict[str, Any], arrays))
    tmp.replace(path)


def load_trainable(path: Path, meta: OnnxMetadata) -> np.ndarray:
    """The base trainable values, after checking the stored set against the metadata's digest."""
    if not path.is_file():
        raise OnnxModelError(f"{path} is missing: export the model with `seedtune export-onnx`")
    with np.load(path, allow_pickle=False) as data:
        indices = [data[f"idx_{i}"] if f"idx_{i}" in data else None for i in range(len(meta.param_names))]
        base = data["base_values"]
    digest = selection_digest(meta.param_names, [tuple(s) for s in meta.param_shapes], indices)
    if digest != meta.trainable_digest or base.shape != (meta.trainable_size,) or base.dtype != np.float32:
        raise OnnxModelError(f"{path} does not hold the trainable set {meta.trainable_digest[:16]} of its model")
    return base
