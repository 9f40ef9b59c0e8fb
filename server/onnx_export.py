"""Export a replica's task model to ONNX with its trainable entries as one graph input.

The graph computes each partly trainable parameter as ``base.index_put(idx, trainable[segment])`` (a
ScatterND onto a constant), so only the small flat vector changes between perturbed forward passes and
everything else is a constant. After export the file is run on ONNX Runtime against the torch model, at
the exported values and at a perturbed vector, and the export fails if the outputs differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from seedtune.shared.engine.directions import direction_numpy
from seedtune.shared.task.models import TextClassifier
from seedtune.shared.task.onnx_format import INPUTS, OnnxMetadata, OnnxModelError, file_sha256, save_trainable, sidecars
from seedtune.shared.engine.replica import Replica
from seedtune.shared.engine.selection import TrainableSet

log = logging.getLogger(__name__)

OPSET = 18
CHECK_SENTENCES = (  # public text of varied length: the export's self-check, no private data involved
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish, and the script assumes that not only "
    "would subtlety be lost on the target audience, but that it's also too stupid to realize that they've "
    "already seen this exact same movie a hundred times",
    "it's a charming and often affecting journey.",
    "unflinchingly bleak and desperate",
    "ok",
)
CHECK_TOLERANCE = 1e-4  # relative to the largest logit (and at least absolute)


class _TrainableInputModel(nn.Module):
    """The task model with its trainable entries taken from one flat input vector."""

    def __init__(self, task: TextClassifier, selection: TrainableSet) -> None:
        super().__init__()
        self.task_module = task.module
        self.selection = selection
        params = dict(task.module.named_parameters())
        self.base = {n: params[n].detach().reshape(-1).clone()
                     for n, idx in zip(selection.names, selection.indices) if idx is not None}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
        weights = {}
        for (name, idx, offset, count), shape in zip(self.selection.segments(), self.selection.shapes):
            segment = trainable[offset : offset + count]
            weights[name] = (segment if idx is None else self.base[name].index_put((idx,), segment)).view(shape)
        return functional_call(self.task_module, weights, (input_ids, attention_mask))


def _with_default(path: Path, values: np.ndarray) -> None:
    """Give the ``trainable`` input a default (an initializer of the same name): the file then runs alone."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    if [i.name for i in graph.input] != list(INPUTS):
        raise OnnxModelError(f"exported graph inputs are {[i.name for i in graph.input]}, expected {list(INPUTS)}")
    graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), "trainable"))
    onnx.save(model, str(path))


def _check(task: TextClassifier, model_path: Path, values: np.ndarray) -> dict[str, float]:
    """ONNX Runtime vs torch logits on public sentences, at the exported values and at a perturbed vector."""
    from seedtune.shared.task.onnx_task import OnnxTask

    ort_task = OnnxTask(model_path)
    probe = task.probe(CHECK_SENTENCES)
    ids = task.encode(probe)
    if ort_task.encode(probe) != ids:
        raise OnnxModelError("the exported tokenizer encodes the check sentences differently from the model's")
    batch = task.collate(ids, np.zeros(len(ids), dtype=np.int64))
    reference = task.logits(batch).numpy()
    exported = ort_task.logits(ids)
    moved = values + np.float32(1e-2) * direction_numpy(12345, 0, values.size)
    ort_moved = ort_task.logits(ids, moved)
    report = {"max_abs_diff": float(np.abs(exported - reference).max()), "scale": float(np.abs(reference).max())}
    tolerance = CHECK_TOLERANCE * max(1.0, report["scale"])
    if report["max_abs_diff"] > tolerance:
        raise OnnxModelError(f"ONNX Runtime logits differ from torch by {report['max_abs_diff']:.3g} "
                             f"(tolerance {tolerance:.3g})")
    if np.abs(ort_moved - exported).max() == 0:
        raise OnnxModelError("the exported graph ignores its trainable input")
    return report


def export_onnx(replica: Replica, out: str | Path, check: bool = True) -> dict[str, Any]:
    """Write ``out`` (and its sidecars) for the replica's current weights; returns a report."""
    start = time.time()
    out = Path(out)
    if out.suffix != ".onnx":
        raise OnnxModelError(f"--out must name a .onnx file, got {out}")
    if replica.task.generation:
        raise OnnxModelError(f"task {replica.config.task.name!r} is a generation task: ONNX export covers "
                             f"classifiers (replay writes the generator as a Hugging Face folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    task, selection = replica.task, replica.selection
    if not task.tokenizer.is_fast:
        raise OnnxModelError(f"the tokenizer of {task.name} has no fast (tokenizers) version to export")
    meta_path, trainable_path, tokenizer_path = sidecars(out)
    values = replica.values()

    wrapper = _TrainableInputModel(task, selection).eval()
    example = task.collate(task.encode(task.probe(CHECK_SENTENCES[:2])), np.zeros(2, dtype=np.int64))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
    tmp = out.with_name(out.name + ".tmp")
    log.info("exporting %s to ONNX (%d trainable entries as input)", task.name, values.size)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # the exporter's progress: keep stdout for JSON
        torch.onnx.export(wrapper, (example.input_ids, example.attention_mask, torch.from_numpy(values)), str(tmp),
                          input_names=list(INPUTS), output_names=["logits"], opset_version=OPSET, dynamo=True,
                          dynamic_shapes={"input_ids": dims, "attention_mask": dims, "trainable": None},
                          external_data=False, optimize=True, verbose=False)
    _with_default(tmp, values)
    tmp.replace(out)

    task.tokenizer.backend_tokenizer.save(str(tokenizer_path))
    save_trainable(trainable_path, [None if idx is None else idx.numpy() for idx in selection.indices],
                   replica.base_values())
    meta = OnnxMetadata(
        model=replica.config.model.name, kind=task.kind, max_length=task.max_length,
        pad_token_id=int(task.tokenizer.pad_token_id), task=dataclasses.asdict(replica.config.task),
        direction=replica.config.zo.direction, base_model_digest=replica.base_digest,
        trainable_digest=replica.trainable_digest, trainable_size=int(values.size),
        param_names=list(selection.names), param_shapes=[list(s) for s in selection.shapes],
        ledger_version=replica.version, ledger_head=replica.head.hex(), state_digest=replica.state_digest(),
        onnx_sha256=file_sha256(out), opset=OPSET,
    )
    meta.write(meta_path)
    report: dict[str, Any] = {"out": str(out), "model": meta.model, "ledger_version": meta.ledger_version,
                              "trainable_entries": meta.trainable_size, "state_digest": meta.state_digest,
                              "onnx_mb": round(out.stat().st_size / 2**20, 1)}
    if check:
        report["check"] = _check(task, out, values)
    report["wall_s"] = round(time.time() - start, 2)
    return report
