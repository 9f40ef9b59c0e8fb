"""Perturbing and updating a model's trainable entries along seeded directions.

:class:`TrainableView` binds a model to a :class:`~shared.selection.TrainableSet`. It is the one place that
writes into trainable weights, for the ZO step (perturb, restore) and for replay (``apply_all``), so the
trainer, a client and the server all change weights through the same arithmetic and agree bit for bit.

Perturbation never accumulates: ``perturb`` writes ``saved + scale * z`` from a snapshot and ``restore``
copies the snapshot back, so no float drift builds up over steps (a pitfall of in-place +mu/-2mu/+mu).
The snapshot holds only the selected entries (1% of the model under default pruning).

Memory speed: every pass works chunk by chunk through buffers the view keeps (the snapshot, a scratch for the
direction, a work chunk for gathered entries), so no pass touches fresh memory: a fresh 90 MB tensor costs
more in page faults than the arithmetic on it. Whole tensors (and index sets that cover a tensor, as SynFlow
keeps at fraction 1.0) are written in place through views; pruned tensors are gathered and scattered once per
chunk and pass, and ``apply_all`` gathers once for all of a round's entries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from shared.directions import CHUNK, SCRATCH_EXTRA, DirectionKind, direction_torch
from shared.selection import TrainableSet

if TYPE_CHECKING:
    from shared.models import TextClassifier

log = logging.getLogger(__name__)


def _covers(idx: torch.Tensor, size: int) -> bool:
    """Whether sorted, distinct flat indices are all of 0 .. size - 1."""
    return idx.numel() == size and (size == 0 or (int(idx[0]) == 0 and int(idx[-1]) == size - 1))


@dataclass(frozen=True)
class _Piece:
    """The part of one parameter that falls in a chunk: positions in its flat view, and where they sit in the
    chunk's slice of the direction."""

    flat: torch.Tensor
    where: slice | torch.Tensor  # a slice of a whole tensor, or flat indices
    at: int
    n: int

    def read(self, out: torch.Tensor) -> None:
        if isinstance(self.where, slice):
            out.copy_(self.flat[self.where])
        else:
            torch.index_select(self.flat, 0, self.where, out=out)

    def write(self, values: torch.Tensor) -> None:
        if isinstance(self.where, slice):
            self.flat[self.where].copy_(values)
        else:
            self.flat.index_copy_(0, self.where, values)


@dataclass(frozen=True)
class _Chunk:
    """Direction entries [start, start + count) and the parameters' pieces they move. ``in_place``: the chunk is
    one slice of one whole tensor, written through that view; any other chunk goes through the work buffer."""

    start: int
    count: int
    pieces: tuple[_Piece, ...]
    in_place: torch.Tensor | None


def _plan(flats: Sequence[torch.Tensor], indices: Sequence[torch.Tensor | None], counts: Sequence[int],
          chunk: int) -> tuple[_Chunk, ...]:
    """Cut the flat direction vector into chunks of ``chunk`` entries and each chunk into parameter pieces:
    one generator call per chunk however many small tensors (biases, norms) it spans."""
    chunks, pieces, start, offset = [], [], 0, 0
    for flat, idx, count in zip(flats, indices, counts):
        lo = 0
        while lo < count:
            n = min(count - lo, start + chunk - (offset + lo))
            where = slice(lo, lo + n) if idx is None else idx[lo : lo + n]
            pieces.append(_Piece(flat, where, offset + lo - start, n))
            lo += n
            if offset + lo == start + chunk:
                chunks.append(pieces)
                pieces, start = [], start + chunk
        offset += count
    if pieces:
        chunks.append(pieces)
    plan = []
    for k, group in enumerate(chunks):
        size = sum(p.n for p in group)
        whole = len(group) == 1 and isinstance(group[0].where, slice)
        plan.append(_Chunk(k * chunk, size, tuple(group), group[0].flat[group[0].where] if whole else None))
    return tuple(plan)


class TrainableView:
    def __init__(self, model: nn.Module, selection: TrainableSet, kind: DirectionKind = "rademacher") -> None:
        params = dict(model.named_parameters())
        missing = [n for n in selection.names if n not in params]
        if missing:
            raise ValueError(f"trainable set names parameters the model lacks: {missing[:5]}")
        for name, shape in zip(selection.names, selection.shapes):
            if tuple(params[name].shape) != tuple(shape):
                raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, the set expects {shape}")
        dtypes = {params[n].dtype for n in selection.names}
        if len(dtypes) != 1:
            raise ValueError(f"the trainable set mixes parameter dtypes {sorted(map(str, dtypes))}; one is needed")
        self.selection = selection
        self.kind = kind
        self._flat = [params[n].data.view(-1) for n in selection.names]
        # None: the whole tensor, written through views; an index set covering the tensor is the tensor
        self._indices = [None if idx is None or _covers(idx, flat.numel()) else idx
                         for flat, idx in zip(self._flat, selection.indices)]
        self._plan = _plan(self._flat, self._indices, selection.counts, CHUNK)
        self._saved: torch.Tensor | None = None  # the snapshot, in direction order, while a step runs
        self._buffers: dict[str, torch.Tensor] = {}  # kept between steps: no pass touches fresh memory

    def _buffer(self, name: str, n: int) -> torch.Tensor:
        """The first n entries of a buffer kept per purpose (at least chunk-sized), in the parameters' dtype."""
        size = self.selection.size if name == "snapshot" else CHUNK + SCRATCH_EXTRA
        if name not in self._buffers:
            like = self._flat[0]
            self._buffers[name] = torch.empty(size, dtype=like.dtype, device=like.device)
        return self._buffers[name][:n]

    def _z(self, seed: int, chunk: _Chunk, scale: float) -> torch.Tensor:
        """scale * z(seed) over the chunk, a view into the scratch buffer (valid until the next call)."""
        like = self._flat[0]
        return direction_torch(seed, chunk.start, chunk.count, self.kind, dtype=like.dtype, device=like.device,
                               scale=scale, scratch=self._buffer("direction", chunk.count + SCRATCH_EXTRA))

    # ------------------------------------------------------------------------------------ perturbation
    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the current selected values; ``perturb`` and ``restore`` work from them."""
        saved = self._buffer("snapshot", self.selection.size)
        for c in self._plan:
            for p in c.pieces:
                p.read(saved[c.start + p.at : c.start + p.at + p.n])
        self._saved = saved

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """Set the selected entries to ``saved + scale * z(seed)``."""
        if self._saved is None:
            raise RuntimeError("perturb() needs snapshot() first")
        for c in self._plan:
            base = self._saved[c.start : c.start + c.count]
            if c.in_place is not None:
                torch.add(base, self._z(seed, c, scale), out=c.in_place)
                continue
            moved = torch.add(base, self._z(seed, c, scale), out=self._buffer("work", c.count))
            for p in c.pieces:
                p.write(moved[p.at : p.at + p.n])

    @torch.no_grad()
    def restore(self) -> None:
        """Put the snapshot back exactly and drop it."""
        if self._saved is None:
            raise RuntimeError("restore() needs snapshot() first")
        for c in self._plan:
            for p in c.pieces:
                p.write(self._saved[c.start + p.at : c.start + p.at + p.n])
        self._saved = None

    @torch.no_grad()
    def set_values(self, values: list[torch.Tensor]) -> None:
        """Write the selected entries, one flat tensor per parameter: the inverse of ``values()``."""
        for flat, idx, v in zip(self._flat, self._indices, values):
            if idx is None:
                flat.copy_(v)
            else:
                flat.index_copy_(0, idx, v)

    # ----------------------------------------------------------------------------------------- updates
    def apply(self, seed: int, coeff: float) -> None:
        """theta += coeff * z(seed) on the selected entries: one ledger entry's effect."""
        self.apply_all([(seed, coeff)])

    @torch.no_grad()
    def apply_all(self, moves: Sequence[tuple[int, float]]) -> None:
        """theta += coeff * z(seed) for each (seed, coeff) in order: the same bits as one ``apply`` after
        another (each entry's addition rounds once, in the same order), each chunk gathered and scattered once
        for all of them."""
        if not moves:
            return
        for c in self._plan:
            values = c.in_place
            if values is None:
                values = self._buffer("work", c.count)
                for p in c.pieces:
                    p.read(values[p.at : p.at + p.n])
            for seed, coeff in moves:
                values.add_(self._z(seed, c, coeff))
            if c.in_place is None:
                for p in c.pieces:
                    p.write(values[p.at : p.at + p.n])

    @torch.no_grad()
    def values(self) -> list[torch.Tensor]:
        """Copies of the selected entries, one flat tensor per parameter (an anchor for the proximal pull)."""
        return [flat[idx].clone() if idx is not None else flat.clone()
                for flat, idx in zip(self._flat, self._indices)]

    @torch.no_grad()
    def pull_towards(self, anchor: list[torch.Tensor], strength: float) -> None:
        """theta -= strength * (theta - anchor): DP-ZOSO's proximal step, deterministic and public.

        Written as separate subtract, multiply and subtract (no fused multiply-add) so that any
        implementation doing the same three float32 operations gets the same bits.
        """
        if strength == 0.0:
            return
        for flat, idx, a in zip(self._flat, self._indices, anchor):
            current = flat if idx is None else flat[idx]  # a view of the weights, or a gathered copy
            delta = torch.sub(current, a)
            delta.mul_(strength)
            current.sub_(delta)
            if idx is not None:
                flat.index_copy_(0, idx, current)


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
