"""The decoder task models (causal LMs, e.g. SmolLM2).

* :class:`DecoderClassifier`: the filled prompt template and the logits of the K label words (" " + word, its
  first token) at the last position, computed from the last hidden state and K output embedding rows only (the
  full vocabulary projection would cost more than the rest of the model).
* :class:`DecoderGenerator`: the mean negative log-likelihood of a target given its prompt (generation tasks),
  and :class:`LineEnd`, which ends a greedy continuation at the end of its first line.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from seedtune.shared.engine.selection import TrainableSet


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

    @property
    def layer_count(self) -> int:
        return len(getattr(self.lm, self.lm.base_model_prefix).layers)

    def layer_of(self, name: str) -> int:
        """The first layer whose output depends on parameter ``name``; the layer count for the final norm."""
        body_prefix = f"lm.{self.lm.base_model_prefix}."
        parts = name.removeprefix(body_prefix).split(".")
        if name.startswith(body_prefix) and parts[0] == "layers":
            return int(parts[1])
        if name.startswith(body_prefix) and parts[0] == "norm":
            return self.layer_count
        return 0  # token embeddings (also the tied label rows) or untied output rows: conservatively none

    def label_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm.get_output_embeddings().weight[self.label_ids]
        return last_hidden.float() @ weight.float().T  # float32 scores whatever the forward dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.label_logits(self.last_hidden(attention_mask, input_ids=input_ids))

    # ----------------------------------------------------------------- the head (TextClassifier's head_*)
    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the label rows read: the last hidden state at the last position, in float32."""
        return self.last_hidden(attention_mask, input_ids=input_ids).float()

    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.label_logits(features)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.lm.get_output_embeddings().weight[self.label_ids].float(), None

    def head_set(self) -> TrainableSet:
        """The label-word rows of the output embedding, in row order."""
        weight = self.lm.get_output_embeddings().weight
        name = next(n for n, p in self.named_parameters() if p is weight)
        rows = torch.sort(self.label_ids.cpu()).values
        width = weight.shape[1]
        indices = (rows[:, None] * width + torch.arange(width)).reshape(-1)
        return TrainableSet((name,), (tuple(weight.shape),), (indices,))

    def head_row_classes(self) -> torch.Tensor:
        """The class of each row of :meth:`head_set`, in its order (the label rows sorted by token id)."""
        if len(set(self.label_ids.tolist())) != len(self.label_ids):
            raise ValueError("two labels share a label word: the head cannot tell their rows apart")
        return torch.argsort(self.label_ids.cpu())

    def head_reads_inputs(self) -> frozenset[int]:
        """The label words' token ids where the output embedding is tied to the input one."""
        tied = self.lm.get_output_embeddings().weight is self.lm.get_input_embeddings().weight
        return frozenset(int(i) for i in self.label_ids.tolist()) if tied else frozenset()

    def synflow_scores(self, ones: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.label_logits(self.last_hidden(mask, inputs_embeds=ones))


class DecoderHeadClassifier(DecoderClassifier):
    """A decoder classifier with a K-row head of its own on the last hidden state (``model.decoder_head =
    "linear"``), initialised from the label words' output rows, so that its zero-shot scores are theirs.

    Why: where the output embedding is tied to the input one (SmolLM2), the label rows are also the input
    embeddings of the label words, so training them moves the features of every record holding one, which a
    head stage then cannot cache. An own head reads nothing but the frozen body's output: every record's
    features are computed once (:class:`shared.engine.update.FeatureCache`)."""

    def __init__(self, lm: nn.Module, label_token_ids: Sequence[int]) -> None:
        super().__init__(lm, label_token_ids)
        rows = self.lm.get_output_embeddings().weight[self.label_ids].detach()
        self.head = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(rows)

    def label_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return last_hidden.float() @ self.head.weight.float().T  # float32 scores whatever the forward dtype

    def layer_of(self, name: str) -> int:
        if name.startswith("head."):  # it reads the final norm's output: every layer lies below it
            return self.layer_count
        return super().layer_of(name)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.weight.float(), None

    def head_set(self) -> TrainableSet:
        return TrainableSet(("head.weight",), (tuple(self.head.weight.shape),), (None,))

    def head_row_classes(self) -> torch.Tensor:
        return torch.arange(self.head.weight.shape[0])

    def head_reads_inputs(self) -> frozenset[int]:
        return frozenset()


class DecoderUnitHeadClassifier(DecoderHeadClassifier):
    """:class:`DecoderHeadClassifier` on the last hidden state scaled to unit L2 norm (``model.decoder_head =
    "unit"``), or on layer ``depth``'s state less a centre, at unit norm (``"centred"``: ``model.head_layer``,
    :meth:`set_centre`); the layers above ``depth`` never run.

    Why unit norm: SmolLM2's last hidden state has norm about 48, so a head step that clips each example's gradient
    ``r x^T`` to norm C keeps about 1/48 of its signal against the same noise, where the DP linear probe, on
    unit-norm features, keeps all of it (TREC at epsilon 1: 67.0 against the probe's 75.4). The scaling is per
    record and data-free, and a positive scale per record leaves the zero-shot predictions of the copied rows
    unchanged (with the zero centre and every layer).

    Why centred: SmolLM2's unit states all point nearly one way (their mean has norm 0.94), so a clipped head step
    spends most of its norm on a direction no class differs in. The centre is the state of the prompt template with
    every text field empty, computed from the model and the public template alone (no record), so every node and
    the server derive the same one. On SST-2's public dev split (DP linear head at epsilon 3) the last state reads
    82.6 raw and 84.6 centred, and layer 22's output centred 86.4; the records' own mean as the centre is no better
    (docs/results.md). The head still starts from the label words' rows, whose zero-shot scores are then no longer
    the model's."""

    centre: torch.Tensor

    def __init__(self, lm: nn.Module, label_token_ids: Sequence[int], depth: int = 0) -> None:
        super().__init__(lm, label_token_ids)
        if not 0 <= depth <= self.layer_count:
            raise ValueError(f"the head reads layer 1 to {self.layer_count} (0: the last); got {depth}")
        self.depth = depth or self.layer_count
        self.register_buffer("centre", torch.zeros(self.hidden_size), persistent=False)  # "unit": zero

    @contextmanager
    def _layers(self, span: slice, final_norm: bool) -> Iterator[nn.Module]:
        # no span reaches above the head's layer; inside another span the list is already cut, so this is a no-op
        start, stop, _ = span.indices(self.depth)
        with super()._layers(slice(start, stop), final_norm and self.depth == self.layer_count) as body:
            yield body

    def hidden_states(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        with self._layers(slice(0, None), final_norm=True):
            return super().hidden_states(attention_mask, **inputs)

    def last_hidden(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        # every path to the head (forward, forward_from, features) reads this: cached and uncached scores agree
        state = super().last_hidden(attention_mask, **inputs).float()
        return nn.functional.normalize(state - self.centre.float(), dim=-1)

    def layer_of(self, name: str) -> int:
        if name.startswith("head."):
            return self.depth
        return super().layer_of(name)

    @torch.no_grad()
    def set_centre(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The centre: the state at ``depth`` of one row, the template with its text fields empty."""
        self.centre.copy_(super().last_hidden(attention_mask, input_ids=input_ids)[0].float())


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

    def synflow_scores(self, ones: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.vocabulary_scores(self.last_hidden(mask, inputs_embeds=ones))


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
