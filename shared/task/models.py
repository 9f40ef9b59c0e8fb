"""Task models: a K-label text classifier (or a generator) over an encoder or a decoder, giving per-example losses.

The task (``shared.task.config.TaskConfig``: text fields, prompt template, labels, label words and prompts) decides
what the model reads and scores; nothing task-specific is written here. :class:`TextClassifier` tokenises,
batches and scores for every kind; what differs by kind lives in the kind's own module
(:mod:`shared.task.encoder`, :mod:`shared.task.decoder`): the forward, the head it reads and trains, the split
at a layer, the SynFlow output (an all-ones input through the body, bypassing token embeddings) for data-free
pruning. Loading is :mod:`shared.task.loading`, placement :mod:`shared.task.placement`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedtune.shared.engine.batching import keep_tail, length_sorted, pad
from seedtune.shared.engine.selection import TrainableSet
from seedtune.shared.task.config import ConfigError, TaskConfig
from seedtune.shared.task.decoder import LineEnd
from seedtune.shared.task.tasks import Prompter, Record, Split, as_record, classification_metrics, generation_metrics

log = logging.getLogger(__name__)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class EvalSet:
    """A split prepared for :meth:`TextClassifier.evaluate`: classification keeps the tokenized records and
    labels; generation keeps each distinct prompt with all its references (BLEU and ROUGE-L against all of
    them) and the tokenized (prompt, reference) pairs (perplexity)."""

    ids: list[list[int]]
    labels: np.ndarray
    prompt_ids: list[list[int]] | None = None
    references: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


class TextClassifier:
    """A task model plus its tokenizer: tokenises once, batches with dynamic padding, scores batches."""

    def __init__(self, name: str, kind: str, module: nn.Module, tokenizer, max_length: int,
                 task: TaskConfig) -> None:
        self.name, self.kind, self.tokenizer, self.max_length = name, kind, tokenizer, max_length
        self.module: Any = module  # an EncoderClassifier, DecoderClassifier or DecoderGenerator: each knows its head
        self.labels, self.prompter = list(task.labels), Prompter.of(task)
        self.generation, self.max_new_tokens = task.kind == "generation", task.max_new_tokens
        self.module.eval()  # no dropout: the two-point estimate needs a deterministic loss
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the forward passes to ``device`` and cast the parameters to ``dtype``. Buffers keep their dtype
        (rotary frequencies stay float32). Weights cast to a half dtype are a forward copy, not the model: the
        trainable entries' truth is the float32 master of :class:`shared.engine.update.TrainableView`."""
        self.module.to(device)
        if dtype != torch.float32:
            for param in self.module.parameters():
                param.data = param.data.to(dtype)
        self.device, self.dtype = device, dtype

    # --------------------------------------------------------------------------------------- inputs
    def encode(self, records: Sequence[Record | str]) -> list[list[int]]:
        """Token ids of each record (a tuple of the task's text fields; a bare string for a one-field task)."""
        fields = self.prompter.fields
        if not records:
            return []
        if self.kind == "decoder":
            texts = [self.prompter.render(r) for r in records]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return keep_tail(ids, self.max_length, self._tail_ids())
        columns = list(zip(*(as_record(r, fields) for r in records)))
        return self.tokenizer(*(list(c) for c in columns), truncation=True, max_length=self.max_length)["input_ids"]

    def examples(self, split: Split) -> tuple[list[list[int]], np.ndarray]:
        """What the ZO step scores: (token ids, labels). Classification: the encoded records and their labels.
        Generation: prompt + " " + target + EOS, and each example's prompt length (its loss is the mean NLL of
        the tokens after it); the prompt keeps its tail and yields room to the target, at most half."""
        if not self.generation:
            return self.encode(split.records), split.labels
        prompts = self.encode(split.records)
        targets = self.tokenizer([" " + t for t in split.targets or []], add_special_tokens=False)["input_ids"]
        tail = self._tail_ids()
        ids, lengths = [], []
        for prompt, target in zip(prompts, targets):
            target = target + [self.eos_token_id]
            prompt = keep_tail([prompt], self.max_length - min(len(target), self.max_length // 2), tail)[0]
            ids.append(prompt + target[: self.max_length - len(prompt)])
            lengths.append(len(prompt))
        return ids, np.asarray(lengths, dtype=np.int64)

    def eval_set(self, split: Split) -> EvalSet:
        ids, labels = self.examples(split)
        if not self.generation:
            return EvalSet(ids, labels)
        grouped: dict[Record, list[str]] = {}
        for record, target in zip(split.records, split.targets or []):
            grouped.setdefault(record, []).append(target)
        return EvalSet(ids, labels, self.encode(list(grouped)), list(grouped.values()))

    @property
    def eos_token_id(self) -> int:
        """The token that ends a target (a BERT-style tokenizer's [SEP] where it has no EOS)."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.sep_token_id

    def _tail_ids(self) -> list[int]:
        return self.tokenizer(self.prompter.tail, add_special_tokens=False)["input_ids"] if self.prompter.tail else []

    def probe(self, texts: Sequence[str]) -> list[Record]:
        """Public probe records (each text in every field) for checks that need some input, never data."""
        return [(t,) * len(self.prompter.fields) for t in texts]

    def collate(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> Batch:
        input_ids, mask = pad(ids, self.tokenizer.pad_token_id)
        return Batch(torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask).to(self.device),
                     torch.as_tensor(labels, dtype=torch.long, device=self.device))

    # -------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.module(batch.input_ids, batch.attention_mask)

    @torch.no_grad()
    def per_example_loss(self, batch: Batch, prefix: torch.Tensor | None = None, depth: int = 0) -> torch.Tensor:
        """Cross-entropy per example; with ``prefix`` (``prefix_hidden(batch, depth)``) only the layers from
        ``depth`` on run."""
        if self.generation:  # the mean NLL of each example's target tokens (batch.labels: prompt lengths)
            return self.module(batch.input_ids, batch.attention_mask, batch.labels, prefix, depth)
        logits = self.logits(batch) if prefix is None else \
            self.module.forward_from(prefix, batch.attention_mask, depth)
        return F.cross_entropy(logits.float(), batch.labels, reduction="none")

    @torch.no_grad()
    def prefix_hidden(self, batch: Batch, depth: int) -> torch.Tensor:
        return self.module.prefix_hidden(batch.input_ids, batch.attention_mask, depth)

    def frozen_depth(self, names: Sequence[str]) -> int:
        """How many leading layers no parameter in ``names`` feeds, where this model can run them apart.

        A ZO step perturbs only ``names``, so the output of those layers is the same in both perturbed
        passes: computing it once saves ``depth / layers`` of one forward per step (a third of the step for a
        set in the top third of the layers). Encoders (BERT-like: ``embeddings``, ``encoder.layer``) and decoders
        split; the split is checked against the full forward on a probe batch and not used (with a warning)
        where the two disagree.
        """
        try:
            depth = min((self.module.layer_of(n) for n in names), default=0)
        except AttributeError as exc:  # a body without the modules the split swaps
            log.warning("cannot tell which layers feed the trainable set (%s); every pass runs the whole model", exc)
            return 0
        if depth == 0:
            return 0
        probe = self.collate(self.encode(self.probe(["a probe.", "a longer probe sentence, checked once."])),
                             np.zeros(2))
        try:
            batched = self.prefix_hidden(probe, depth)
            split = self.per_example_loss(probe, batched, depth)
            # as ScoredView.prepare keeps them: each record's states computed alone, right-padded with zeros
            alone = torch.zeros_like(batched)
            for i, n in enumerate(probe.attention_mask.sum(-1).tolist()):
                row = Batch(probe.input_ids[i:i + 1, :n], probe.attention_mask[i:i + 1, :n], probe.labels[i:i + 1])
                alone[i, :n] = self.prefix_hidden(row, depth)[0]
            padded = self.per_example_loss(probe, alone, depth)
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            # a body without the swapped modules, other inputs, or a module between the embeddings and the first
            # layer (ELECTRA's projection) whose shapes then do not fit
            log.warning("cannot run the first %d layers apart (%s); every pass runs the whole model", depth, exc)
            return 0
        tol = 1e-5 if self.dtype == torch.float32 else 2e-2  # half-precision kernels may round differently
        full = self.per_example_loss(probe)
        if not all(torch.allclose(x, full, rtol=tol, atol=tol / 10) for x in (split, padded)):
            log.warning("the first %d layers run apart do not reproduce the full forward for %s; every pass "
                        "runs the whole model", depth, self.name)
            return 0
        return depth

    # --------------------------------------------------------------------------------- head features
    @torch.no_grad()
    def features(self, batch: Batch) -> torch.Tensor:
        """What the classifier head reads, in float32: the encoder's normalised mean-pooled embedding, the
        decoder's last hidden state at the last position (its model.decoder_head's reading of it: at unit norm, or
        layer model.head_layer's state centred). ``head_scores(features(b))`` is ``logits(b)``: the
        frozen body's part of a forward, which a linear probe (and a step that trains only the head) needs
        once per record."""
        if self.generation:
            raise ValueError("a generation task has no classifier head to read features for")
        return self.module.features(batch.input_ids, batch.attention_mask)

    @torch.no_grad()
    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The class scores of :meth:`features`: the encoder's head, the decoder's label rows."""
        return self.module.head_scores(features)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's current rows (K x features) and bias (None for a decoder), in float32."""
        return self.module.head_weights()

    def head_set(self) -> TrainableSet:
        """The classifier head's entries (``selection.mode = "head"``): the encoder's head (weight and bias), or
        the decoder's label-word rows of its output embedding (in row order)."""
        if self.generation:
            raise ConfigError("selection.mode 'head' trains a classifier head: a generation task has none")
        return self.module.head_set()

    def head_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each entry of :meth:`head_set` (in its flat order) sits in the head: its class (the score's
        index) and its feature column, the column ``features`` standing for the encoder's bias (a constant 1).
        Score c is then ``sum_j [class_j = c] value_j x_col_j`` over the head's entries, x the features and a 1:
        what lets a step evaluate the head at many perturbations at once (:class:`shared.engine.update.ScoredView`)."""
        weight, bias = self.head_weights()
        classes, width = weight.shape
        rows = self.module.head_row_classes().repeat_interleave(width)  # the rows as the head set holds them
        cols = torch.arange(width).repeat(classes)
        if bias is not None:  # the encoder: head.weight row-major, then head.bias
            return torch.cat([rows, torch.arange(classes)]), torch.cat([cols, torch.full((classes,), width)])
        return rows, cols

    def head_reads_inputs(self) -> frozenset[int]:
        """Token ids whose input embedding is a trainable head row (a tied decoder's label words): a record
        holding one has features that move with the head, so they are never cached."""
        return self.module.head_reads_inputs()

    def all_features(self, ids: Sequence[Sequence[int]], batch_size: int = 64, progress: bool = False,
                     desc: str = "features") -> torch.Tensor:
        """:meth:`features` of every record, in the order of ``ids`` (length-sorted batches, on the CPU)."""
        if len(ids) == 0:
            raise ValueError("cannot compute the features of an empty split")
        out: torch.Tensor | None = None
        for rows in _batches(ids, batch_size, desc if progress else ""):
            part = self.features(self.collate([ids[i] for i in rows], np.zeros(len(rows), dtype=np.int64))).cpu()
            if out is None:
                out = torch.empty(len(ids), part.shape[1], dtype=torch.float32)
            out[torch.as_tensor(rows)] = part
        assert out is not None
        return out

    def synflow_output(self) -> torch.Tensor:
        """R for SynFlow: the summed class scores of an all-ones embedded input (no data involved). Scored on the
        float32 model only (a replica scores it on the CPU, before place(), so that every node derives the same
        trainable set)."""
        if self.dtype != torch.float32:
            raise RuntimeError("SynFlow scores the float32 model: select the trainable set before place()")
        length = 8
        ones = torch.ones(1, length, self.module.hidden_size, device=self.device)
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        return self.module.synflow_scores(ones, mask).sum()

    def predictions(self, ids: Sequence[Sequence[int]], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Predicted labels in the order of ``ids``, scored in length-sorted batches (less padding, same result)."""
        if len(ids) == 0:
            raise ValueError("cannot score an empty split")
        predicted = np.empty(len(ids), dtype=np.int64)
        for rows in _batches(ids, batch_size, "evaluating" if progress else ""):
            batch = self.collate([ids[i] for i in rows], np.zeros(len(rows), dtype=np.int64))
            predicted[rows] = self.logits(batch).argmax(-1).cpu().numpy()
        return predicted

    def accuracy(self, ids: Sequence[Sequence[int]], labels: np.ndarray, batch_size: int = 64,
                 progress: bool = False) -> float:
        return int((self.predictions(ids, batch_size, progress) == labels).sum()) / len(ids)

    def evaluate(self, data: EvalSet, batch_size: int = 64, progress: bool = False) -> dict:
        """Classification: accuracy, macro-F1 and per-label counts (shared.task.tasks.classification_metrics).
        Generation: greedy continuations of the distinct prompts scored with BLEU and ROUGE-L against all
        their references, and the perplexity of the references (shared.task.tasks.generation_metrics)."""
        if not self.generation:
            return classification_metrics(self.predictions(data.ids, batch_size, progress), data.labels, self.labels)
        nll = np.empty(len(data.ids), dtype=np.float64)
        for rows in length_sorted(data.ids, batch_size):
            nll[rows] = self.per_example_loss(self.collate([data.ids[i] for i in rows], data.labels[rows])).cpu()
        counts = np.asarray([len(x) for x in data.ids]) - data.labels
        if data.prompt_ids is None or data.references is None:
            raise ValueError("a generation task's evaluation set needs its prompts and references (eval_set)")
        hypotheses = self.generate(data.prompt_ids, self.max_new_tokens, batch_size, progress)
        return generation_metrics(hypotheses, data.references, float((nll * counts).sum()), int(counts.sum()))

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16,
                 progress: bool = False) -> list[str]:
        """Greedy continuations, their first non-empty line, in the order of ``prompt_ids`` (left-padded
        batches of similar length through the LM's cached decoding). A row stops at the end of that line, not
        at ``max_new_tokens``: the rest would be thrown away (it halves a zero-shot evaluation's time)."""
        from transformers import GenerationConfig

        pad, eos = self.tokenizer.pad_token_id, self.eos_token_id
        settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                                    eos_token_id=eos)
        out: list[str] = [""] * len(prompt_ids)
        for rows in _batches(prompt_ids, batch_size, "generating" if progress else ""):
            seqs = [list(prompt_ids[i]) for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, width - len(s):], mask[j, width - len(s):] = torch.tensor(s), 1
            generated = self.module.lm.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                                generation_config=settings,
                                                stopping_criteria=[self._line_end(width)])
            for i, text in zip(rows, self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)):
                out[i] = text.strip().split("\n")[0].strip()  # the first non-empty line
        return out

    def _line_end(self, width: int) -> "LineEnd":
        if not hasattr(self, "_token_kinds"):
            self._token_kinds = LineEnd.token_kinds(self.tokenizer).to(self.device)
        return LineEnd(self._token_kinds, width)


def _batches(ids: Sequence[Sequence[int]], batch_size: int, progress: str = "") -> Iterable[np.ndarray]:
    """Length-sorted batches of ``ids``; with a progress bar named ``progress`` when one is given."""
    batches: Iterable[np.ndarray] = length_sorted(ids, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(ids) // batch_size), desc=progress, unit="batch", leave=False)
    return batches
