"""The encoder task model (BERT-like, e.g. MiniLM): the mean-pooled, L2-normalised embedding of the text (or of
the pair, joined by the tokenizer) and a linear head of K rows. The head starts as a zero-shot classifier, its
rows the normalised embeddings of the K public label prompts (:mod:`shared.task.loading`), so the model has a
meaningful zero-shot accuracy before any private step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from seedtune.shared.engine.selection import TrainableSet


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

    # ----------------------------------------------------------------- the head (TextClassifier's head_*)
    @property
    def hidden_size(self) -> int:
        return self.body.config.hidden_size

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the head reads: the normalised mean-pooled embedding, in float32."""
        return self.embed(input_ids, attention_mask)

    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.weight.float(), self.head.bias.float()

    def head_set(self) -> TrainableSet:
        """The head's weight and bias, whole."""
        return TrainableSet(("head.weight", "head.bias"), (tuple(self.head.weight.shape), tuple(self.head.bias.shape)),
                            (None, None))

    def head_row_classes(self) -> torch.Tensor:
        return torch.arange(self.head.weight.shape[0])

    def head_reads_inputs(self) -> frozenset[int]:
        return frozenset()  # the head is not an input embedding

    def synflow_scores(self, ones: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.scores(self.embed(None, mask, inputs_embeds=ones))

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
