"""The exported classifier on ONNX Runtime, with numpy only: tokenise, score, per-example loss, accuracy.

Used by ONNX Runtime nodes (:mod:`client.onnx_runtime`) and by the exporter's own check
(:mod:`server.onnx_export`), so it lives where both can import it; no torch is imported here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from seedtune.shared.engine.batching import keep_tail, length_sorted, pad
from seedtune.shared.task.onnx_format import OnnxMetadata, OnnxModelError, file_sha256, sidecars
from seedtune.shared.task.tasks import Prompter, Record, Split, as_record

log = logging.getLogger(__name__)


DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def check_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The execution providers to ask ONNX Runtime for, in order of preference. A provider this onnxruntime
    build lacks is an error naming it (list ``CPUExecutionProvider`` last for ONNX Runtime's own fallback)."""
    if not requested:
        raise OnnxModelError("onnx-providers is empty: name at least one execution provider")
    missing = [p for p in requested if p not in available]
    if missing:
        raise OnnxModelError(f"onnx-providers {', '.join(missing)} not available in this onnxruntime build "
                             f"(available: {', '.join(available)}); install the matching onnxruntime package "
                             f"(e.g. onnxruntime-gpu for CUDAExecutionProvider) or list only available ones")
    return list(requested)


class OnnxTask:
    """The exported classifier: tokenises like :class:`shared.task.models.TextClassifier` and scores batches."""

    def __init__(self, model_path: str | Path, threads: int = 0,
                 providers: Sequence[str] = DEFAULT_PROVIDERS) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = Path(model_path)
        meta_path, self.trainable_path, tokenizer_path = sidecars(path)
        self.meta = OnnxMetadata.read(meta_path)
        if not path.is_file():
            raise OnnxModelError(f"ONNX model {path} not found")
        if file_sha256(path) != self.meta.onnx_sha256:
            raise OnnxModelError(f"{path} differs from the file its metadata describes (SHA-256 mismatch)")
        self.name, self.kind, self.max_length = self.meta.model, self.meta.kind, self.meta.max_length
        self.prompter = Prompter(self.meta.task["template"], tuple(self.meta.task["text_fields"]))
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if self.kind == "encoder":
            self.tokenizer.enable_truncation(self.max_length)
        else:
            self._tail = self.tokenizer.encode(self.prompter.tail, add_special_tokens=False).ids \
                if self.prompter.tail else []
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the overridable `trainable` initializer is by design; no warning for it
        if threads:
            options.intra_op_num_threads = threads
        wanted = check_providers(providers, ort.get_available_providers())
        self.session = ort.InferenceSession(str(path), options, providers=wanted)
        self.provider = self.session.get_providers()[0]  # the one ONNX Runtime actually uses first
        if self.provider != wanted[0]:
            log.warning("ONNX Runtime could not start %s; running on %s", wanted[0], self.provider)

    # --------------------------------------------------------------------------------------- inputs
    def encode(self, records: Sequence[Record | str]) -> list[list[int]]:
        if self.kind == "decoder":
            texts = [self.prompter.render(r) for r in records]
            ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
            return keep_tail(ids, self.max_length, self._tail)
        rows = [as_record(r, self.prompter.fields) for r in records]
        return [e.ids for e in self.tokenizer.encode_batch([r[0] if len(r) == 1 else r for r in rows])]

    def examples(self, split: Split) -> tuple[list[list[int]], np.ndarray]:
        """What the ZO step scores: the encoded records and their labels (ONNX nodes run classifiers)."""
        return self.encode(split.records), split.labels

    # -------------------------------------------------------------------------------------- scoring
    def logits(self, ids: Sequence[Sequence[int]], trainable: np.ndarray | None = None) -> np.ndarray:
        """Class logits; ``trainable=None`` uses the values stored in the file (the exported model)."""
        input_ids, mask = pad(ids, self.meta.pad_token_id)
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if trainable is not None:
            feed["trainable"] = trainable
        return self.session.run(["logits"], feed)[0]

    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray,
                         trainable: np.ndarray | None = None) -> np.ndarray:
        logits = self.logits(ids, trainable).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logsumexp = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        return (logsumexp - logits[np.arange(len(labels)), labels]).astype(np.float32)

    def predictions(self, ids: Sequence[Sequence[int]], batch_size: int = 64,
                    trainable: np.ndarray | None = None) -> np.ndarray:
        """Predicted labels in the order of ``ids``, scored in length-sorted batches."""
        if len(ids) == 0:
            raise ValueError("cannot score an empty split")
        predicted = np.empty(len(ids), dtype=np.int64)
        for rows in length_sorted(ids, batch_size):
            predicted[rows] = self.logits([ids[i] for i in rows], trainable).argmax(-1)
        return predicted

    def accuracy(self, ids: Sequence[Sequence[int]], labels: np.ndarray, batch_size: int = 64,
                 trainable: np.ndarray | None = None) -> float:
        return float((self.predictions(ids, batch_size, trainable) == labels).mean())
