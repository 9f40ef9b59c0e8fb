"""Perturbing and updating a model's trainable entries along seeded directions.

:class:`TrainableView` binds a model to a :class:`~shared.selection.TrainableSet`. It is the one place that
writes into trainable weights, for the ZO step (perturb, restore) and for replay (``apply``), so the trainer,
a client and the server all change weights through the same arithmetic and agree bit for bit.

Perturbation never accumulates: ``perturb`` writes ``saved + scale * z`` from a snapshot and ``restore``
copies the snapshot back, so no float drift builds up over steps (a pitfall of in-place +mu/-2mu/+mu).
The snapshot holds only the selected entries (1% of the model under default pruning).
All writes go through views of the live parameters (``flat[idx] = ...``), never through a copy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from shared.directions import CHUNK, DirectionKind, direction_torch
from shared.selection import TrainableSet

if TYPE_CHECKING:
    from shared.models import TextClassifier

log = logging.getLogger(__name__)


class TrainableView:
    def __init__(self, model: nn.Module, selection: TrainableSet, kind: DirectionKind = "rademacher") -> None:
        params = dict(model.named_parameters())
        missing = [n for n in selection.names if n not in params]
        if missing:
            raise ValueError(f"trainable set names parameters the model lacks: {missing[:5]}")
        for name, shape in zip(selection.names, selection.shapes):
            if tuple(params[name].shape) != tuple(shape):
                raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, the set expects {shape}")
        self.selection = selection
        self.kind = kind
        self._flat = [params[n].data.view(-1) for n in selection.names]
        self._saved: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ chunks
    def _chunks(self) -> Iterator[tuple[int, torch.Tensor, slice | torch.Tensor, int, int, int]]:
        """Per chunk: segment number, flat parameter, positions in it, direction offset, offset within
        the segment, count."""
        for seg, (flat, (_, idx, offset, count)) in enumerate(zip(self._flat, self.selection.segments())):
            for lo in range(0, count, CHUNK):
                n = min(CHUNK, count - lo)
                where = slice(lo, lo + n) if idx is None else idx[lo : lo + n]
                yield seg, flat, where, offset + lo, lo, n

    def _z(self, seed: int, start: int, count: int, like: torch.Tensor) -> torch.Tensor:
        return direction_torch(seed, start, count, self.kind, dtype=like.dtype, device=like.device)

    # ------------------------------------------------------------------------------------ perturbation
    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the current selected values; ``perturb`` and ``restore`` work from them."""
        self._saved = [flat[idx].clone() if idx is not None else flat.clone()
                       for flat, idx in zip(self._flat, self.selection.indices)]

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """Set the selected entries to ``saved + scale * z(seed)``."""
        if self._saved is None:
            raise RuntimeError("perturb() needs snapshot() first")
        for seg, flat, where, start, lo, n in self._chunks():
            base = self._saved[seg][lo : lo + n]
            flat[where] = torch.add(base, self._z(seed, start, n, base), alpha=scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the snapshot back exactly and drop it."""
        if self._saved is None:
            raise RuntimeError("restore() needs snapshot() first")
        self.set_values(self._saved)
        self._saved = None

    @torch.no_grad()
    def set_values(self, values: list[torch.Tensor]) -> None:
        """Write the selected entries, one flat tensor per parameter: the inverse of ``values()``."""
        for flat, idx, v in zip(self._flat, self.selection.indices, values):
            if idx is None:
                flat.copy_(v)
            else:
                flat[idx] = v

    # ----------------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def apply(self, seed: int, coeff: float) -> None:
        """theta += coeff * z(seed) on the selected entries: one ledger entry's effect."""
        for _, flat, where, start, _, n in self._chunks():
            values = flat[where]
            values.add_(self._z(seed, start, n, values), alpha=coeff)
            flat[where] = values

    @torch.no_grad()
    def values(self) -> list[torch.Tensor]:
        """Copies of the selected entries, one flat tensor per parameter (an anchor for the proximal pull)."""
        return [flat[idx].clone() if idx is not None else flat.clone()
                for flat, idx in zip(self._flat, self.selection.indices)]

    @torch.no_grad()
    def pull_towards(self, anchor: list[torch.Tensor], strength: float) -> None:
        """theta -= strength * (theta - anchor): DP-ZOSO's proximal step, deterministic and public.

        Written as separate subtract, multiply and subtract (no fused multiply-add) so that any
        implementation doing the same three float32 operations gets the same bits.
        """
        if strength == 0.0:
            return
        for flat, idx, a in zip(self._flat, self.selection.indices, anchor):
            current = flat if idx is None else flat[idx]  # a view of the weights, or a gathered copy
            delta = torch.sub(current, a)
            delta.mul_(strength)
            current.sub_(delta)
            if idx is not None:
                flat[idx] = current


class ScoredView(TrainableView):
    """A trainable view that also scores examples with its task model: what the ZO step needs of a model
    (:class:`client.zo_step.ZoModel`), on torch."""

    def __init__(self, task: TextClassifier, selection: TrainableSet, kind: DirectionKind = "rademacher") -> None:
        super().__init__(task.module, selection, kind)
        self.task = task
        # Layers below the trainable set see the same weights in every pass of a step: their output is
        # computed once per batch, between snapshot() and restore(), and reused by both perturbed passes.
        self.depth = task.frozen_depth(selection.names)
        self._prefixes: dict[tuple[tuple[int, ...], ...], torch.Tensor] = {}
        if self.depth:
            log.info("trainable set starts at layer %d: layers 0-%d run once per batch, not once per pass",
                     self.depth, self.depth - 1)

    def snapshot(self) -> None:
        self._prefixes.clear()
        super().snapshot()

    def restore(self) -> None:
        super().restore()
        self._prefixes.clear()

    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        batch = self.task.collate(ids, labels)
        if not self.depth or self._saved is None:
            return self.task.per_example_loss(batch).numpy()
        key = tuple(tuple(x) for x in ids)
        if key not in self._prefixes:
            self._prefixes[key] = self.task.prefix_hidden(batch, self.depth)
        return self.task.per_example_loss(batch, self._prefixes[key], self.depth).numpy()
