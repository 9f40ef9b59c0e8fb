"""Perturbing and updating a model's trainable entries along seeded directions.

:class:`TrainableView` binds a model to a :class:`~shared.engine.selection.TrainableSet`. It is the one place that
writes into trainable weights, for the ZO step (perturb, restore) and for replay (``apply_all``), so the
trainer, a client and the server all change weights through the same arithmetic and agree bit for bit.

The truth is a float32 **master copy** of the selected entries (1% of the model under default pruning), kept on
the model's device in direction order; the parameters hold its cast. For a float32 model the cast is a copy;
for a bfloat16 or float16 forward a ZO update of 1e-5 on a weight of 0.05 would be lost to rounding in the
half-precision weight, but it is kept in the master, so a replay (in any dtype, on any device) reaches the same
float32 values. The parameters are written only through the view (a change made to them behind its back is
overwritten at its next write). Perturbation never accumulates: ``perturb`` writes ``master + scale * z`` and ``restore`` writes
the master back, so no float drift builds up over steps (a pitfall of in-place +mu/-2mu/+mu).

Memory speed: every pass works chunk by chunk through buffers the view keeps (a scratch for the direction, work
chunks for moved values), so no pass touches fresh memory: a fresh 90 MB tensor costs more in page faults than
the arithmetic on it. Whole float32 tensors (and index sets that cover a tensor, as SynFlow keeps at fraction
1.0) are written in place through views; pruned or half-precision tensors are scattered once per chunk and pass,
and ``apply_all`` writes once for all of a round's entries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from seedtune.shared.engine.directions import (CHUNK, SCRATCH_EXTRA, DirectionKind, direction_torch, transform_length,
                                               walsh_hadamard)
from seedtune.shared.engine.selection import TrainableSet

if TYPE_CHECKING:
    from seedtune.shared.task.models import TextClassifier

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

    def write(self, values: torch.Tensor) -> None:
        if isinstance(self.where, slice):
            self.flat[self.where].copy_(values)
        else:
            self.flat.index_copy_(0, self.where, values)


@dataclass(frozen=True)
class _Chunk:
    """Direction entries [start, start + count) and the parameters' pieces they move. ``in_place``: the chunk is
    one slice of one whole float32 tensor, written through that view; any other chunk is scattered."""

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
        whole = len(group) == 1 and isinstance(group[0].where, slice) and group[0].flat.dtype == torch.float32
        plan.append(_Chunk(k * chunk, size, tuple(group), group[0].flat[group[0].where] if whole else None))
    return tuple(plan)


class TrainableView:
    def __init__(self, model: nn.Module, selection: TrainableSet, kind: DirectionKind = "rademacher",
                 values: Sequence[torch.Tensor] | None = None) -> None:
        """``values``: the float32 master's starting values, one flat tensor per parameter (``values()`` of a
        view of the float32 model before it was cast to a half-precision forward dtype); default: the
        parameters' own values."""
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
        self.dtype, self.device = self._flat[0].dtype, self._flat[0].device
        # None: the whole tensor, written through views; an index set covering the tensor is the tensor
        self._indices = [None if idx is None or _covers(idx, flat.numel()) else idx
                         for flat, idx in zip(self._flat, selection.indices)]
        self._plan = _plan(self._flat, self._indices, selection.counts, CHUNK)
        self._offsets = np.concatenate([[0], np.cumsum(selection.counts)]).tolist()  # each parameter's span
        self._buffers: dict[str, torch.Tensor] = {}  # kept between steps: no pass touches fresh memory
        self._master = torch.empty(selection.size, dtype=torch.float32, device=self.device)
        if values is None:
            for c in self._plan:  # once, at construction: a gathered copy per piece is fine here
                for p in c.pieces:
                    self._master[c.start + p.at : c.start + p.at + p.n].copy_(p.flat[p.where])
        else:
            self.set_values(values)
        self._stepping = False  # between snapshot() and restore()

    def _buffer(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The first n entries of a chunk-sized buffer kept per purpose."""
        key = f"{name}:{dtype}"
        if key not in self._buffers:
            self._buffers[key] = torch.empty(CHUNK + SCRATCH_EXTRA, dtype=dtype, device=self.device)
        return self._buffers[key][:n]

    def _cast_buffer(self, n: int) -> torch.Tensor:
        return self._buffer("cast", n, self.dtype)

    def _z(self, seed: int, chunk: _Chunk, scale: float) -> torch.Tensor:
        """scale * z(seed) over the chunk in float32, a view into the scratch buffer (valid until the next call)."""
        return direction_torch(seed, chunk.start, chunk.count, self.kind, dtype=torch.float32, device=self.device,
                               scale=scale, scratch=self._buffer("direction", chunk.count + SCRATCH_EXTRA))

    def _store(self, c: _Chunk, values: torch.Tensor) -> None:
        """Write a chunk's float32 values into the parameters (cast to their dtype)."""
        if c.in_place is not None:
            c.in_place.copy_(values)
            return
        if self.dtype != torch.float32:
            values = self._cast_buffer(c.count).copy_(values)
        for p in c.pieces:
            p.write(values[p.at : p.at + p.n])

    def _store_all(self) -> None:
        for c in self._plan:
            self._store(c, self._master[c.start : c.start + c.count])

    # ------------------------------------------------------------------------------------ perturbation
    def snapshot(self) -> None:
        """Begin a step: ``perturb`` and ``restore`` work from the master, which only ``apply`` moves."""
        self._stepping = True

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """Set the selected entries to ``master + scale * z(seed)``."""
        if not self._stepping:
            raise RuntimeError("perturb() needs snapshot() first")
        for c in self._plan:
            base = self._master[c.start : c.start + c.count]
            if c.in_place is not None:
                torch.add(base, self._z(seed, c, scale), out=c.in_place)
                continue
            self._store(c, torch.add(base, self._z(seed, c, scale), out=self._buffer("work", c.count)))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the master's values back exactly and end the step."""
        if not self._stepping:
            raise RuntimeError("restore() needs snapshot() first")
        self._store_all()
        self._stepping = False

    @torch.no_grad()
    def set_values(self, values: Sequence[torch.Tensor]) -> None:
        """Write the selected entries, one flat float32 tensor per parameter: the inverse of ``values()``."""
        for i, v in enumerate(values):
            self._master[self._offsets[i] : self._offsets[i + 1]].copy_(v)
        self._store_all()

    # ----------------------------------------------------------------------------------------- updates
    def apply(self, seed: int, coeff: float) -> None:
        """theta += coeff * z(seed) on the selected entries: one ledger entry's effect."""
        self.apply_all([(seed, coeff)])

    @torch.no_grad()
    def apply_all(self, moves: Sequence[tuple[int, float]]) -> None:
        """theta += coeff * z(seed) for each (seed, coeff) in order, in float32 on the master: the same bits as
        one ``apply`` after another (each entry's addition rounds once, in the same order), each chunk written
        to the parameters once for all of them.

        Hadamard directions are the exception, by rule: a frame (a run of moves under one sign key with rising
        rows, what one step releases; :func:`frame_runs`) is added as one float32 sum, computed exactly enough in
        float64 by one Walsh-Hadamard transform instead of K direction generations. Every applier (trainer,
        replay, follower) passes whole rounds here, so they all cut the same runs and agree bit for bit."""
        if not moves:
            return
        runs = frame_runs(moves, self.selection.size) if self.kind == "hadamard" else [(0, len(moves), False)]
        for c in self._plan:
            values = self._master[c.start : c.start + c.count]
            for first, last, frame in runs:
                if frame:
                    values.add_(self._frame_sum(moves[first:last], c))
                    continue
                for seed, coeff in moves[first:last]:
                    values.add_(self._z(seed, c, coeff))
            self._store(c, values)

    def _frame_sum(self, moves: Sequence[tuple[int, float]], chunk: _Chunk) -> torch.Tensor:
        """sum_k coeff_k z_k over the chunk (the whole set: frames are summed only for sets of one chunk, so
        the transform runs once per frame), float64 then rounded once to float32: the Hadamard rows' weighted
        sum is the transform of the coefficients placed at their rows, times the key's signs."""
        rows = torch.tensor([seed & 0xFFFFFFFF for seed, _ in moves], dtype=torch.long)
        placed = torch.zeros(transform_length(int(rows.max()), self.selection.size), dtype=torch.float64)
        placed[rows] = torch.tensor([coeff for _, coeff in moves], dtype=torch.float64)
        signs = direction_torch(moves[0][0] >> 32, chunk.start, chunk.count, "rademacher", dtype=torch.float64)
        total = walsh_hadamard(placed)[chunk.start : chunk.start + chunk.count].mul_(signs)
        return total.to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def values(self) -> list[torch.Tensor]:
        """Copies of the master's entries (float32, on the model's device), one flat tensor per parameter."""
        return [self._master[a:b].clone() for a, b in zip(self._offsets, self._offsets[1:])]

    @torch.no_grad()
    def pull_towards(self, anchor: list[torch.Tensor], strength: float) -> None:
        """theta -= strength * (theta - anchor): DP-ZOSO's proximal step, deterministic and public.

        Written as separate subtract, multiply and subtract (no fused multiply-add) so that any
        implementation doing the same three float32 operations gets the same bits.
        """
        if strength == 0.0:
            return
        for a, b, target in zip(self._offsets, self._offsets[1:], anchor):
            current = self._master[a:b]
            delta = torch.sub(current, target)
            delta.mul_(strength)
            current.sub_(delta)
        self._store_all()


FRAME_LIMIT = CHUNK  # the largest trainable set whose Hadamard frames are summed by a transform (one chunk)


def frame_runs(moves: Sequence[tuple[int, float]], size: int) -> list[tuple[int, int, bool]]:
    """``moves`` cut into [first, last) runs, each a frame (True: at least two Hadamard moves under one sign key,
    rows strictly rising, as one step draws them with :func:`shared.engine.directions.step_seeds`) or a single move.
    A set larger than :data:`FRAME_LIMIT` has no frames (its moves are applied one by one)."""
    runs: list[tuple[int, int, bool]] = []
    first = 0
    for i in range(1, len(moves) + 1):
        if i < len(moves) and size <= FRAME_LIMIT and moves[i][0] >> 32 == moves[i - 1][0] >> 32 \
                and moves[i][0] & 0xFFFFFFFF > moves[i - 1][0] & 0xFFFFFFFF:
            continue
        runs.append((first, i, i - first > 1))
        first = i
    return runs


class FeatureCache:
    """Each record's frozen part of a forward, computed once: its features (:meth:`TextClassifier.features`) for
    a trainable set that is the classifier head only, so that a step costs the head's scores, not the model's;
    or, with ``depth``, its hidden states after the first ``depth`` layers (:meth:`TextClassifier.prefix_hidden`)
    for a set that lies wholly above them, so that a step runs only the layers from ``depth`` on.

    A record's cached part must be a function of that record alone (the sensitivity argument), and the same bits
    however they were reached: from the cache, recomputed, or from a cache that was full. So each record has one
    canonical computation: in a batch of fixed shape, :data:`GROUP` rows of the record's own length (no
    padding; rows a group lacks are copies of its first record), where this machine's forward treats the rows
    of such a batch on their own; else alone (a batch of one). Which lengths qualify is checked once per length
    on synthetic public token rows (:meth:`_rows_independent`: no row's bits may change with its position or
    its batch-mates), not assumed; MiniLM's shortest records, which differ from themselves computed alone,
    are rows on their own in a fixed shape. Records holding a token whose input embedding is a trainable head
    row (a tied decoder's label words) are never cached: their features move with the head. Memory: at most
    ``budget_mb`` (then records are computed afresh each time); in memory only, never released, gone with the
    process."""

    GROUP = 8  # rows of every batch a record's features are computed in (when its length qualifies)

    def __init__(self, task: TextClassifier, budget_mb: int, depth: int | None = None) -> None:
        self.task, self.depth = task, depth
        # a prefix lies below every trainable entry (frozen_depth), so no input embedding in it moves
        self.live = task.head_reads_inputs() if depth is None else frozenset()
        self.budget = budget_mb * 2**20
        self.store: dict[tuple[int, ...], torch.Tensor] = {}
        self.bytes = 0
        self.grouped: dict[int, bool] = {}  # record length -> computed in fixed-shape groups (else alone)

    def _forward(self, records: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """The cached part of records of one length, one row each (no padding)."""
        batch = self.task.collate(list(records), np.zeros(len(records), dtype=np.int64))
        return self.task.features(batch) if self.depth is None else self.task.prefix_hidden(batch, self.depth)

    def _rows_independent(self, length: int) -> bool:
        """Whether, in a batch of GROUP rows of ``length`` tokens, every row's features are the same bits at any
        position and beside any batch-mates: checked on token rows drawn with a fixed public seed (nothing of
        the data), as a reversed group and as a row moved into another group."""
        vocab = len(self.task.tokenizer)
        rng = np.random.default_rng(length)
        rows = [tuple(int(t) for t in rng.integers(min(1000, vocab // 2), vocab, size=length))
                for _ in range(2 * self.GROUP)]
        first, second = rows[: self.GROUP], rows[self.GROUP:]
        base = self._forward(first)
        if not torch.equal(self._forward(first[::-1]).flip(0), base):
            return False
        moved = second[:-1] + [first[0]]
        return torch.equal(self._forward(moved)[-1], base[0])

    def _computed(self, records: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """The canonical features of ``records``, all of one length."""
        length = len(records[0])
        if length not in self.grouped:
            self.grouped[length] = self._rows_independent(length)
            if not self.grouped[length]:
                # (not which length: on a node, the lengths are its private records')
                log.info("for some record lengths, rows of a batch depend on each other here: those records are "
                         "computed alone")
        if not self.grouped[length]:
            return [self._forward([r])[0] for r in records]
        out: list[torch.Tensor] = []
        for first in range(0, len(records), self.GROUP):
            group = list(records[first : first + self.GROUP])
            out.extend(self._forward(group + [group[0]] * (self.GROUP - len(group)))[: len(group)])
        return out

    def _keep(self, key: tuple[int, ...], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.live.isdisjoint(key) and self.bytes + size <= self.budget:
            self.store[key] = value.clone()  # not a view that would keep its whole group's batch alive
            self.bytes += size

    def features(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The features of ``ids`` stacked in order (see :meth:`rows`)."""
        return torch.stack(self.rows(ids))

    def padded(self, ids: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        """The prefix hidden states of ``ids`` (see :meth:`rows`) as one right-padded batch of ``width`` positions,
        as :meth:`TextClassifier.collate` pads the same records (padded positions hold zeros: the attention mask
        hides them from every real position)."""
        rows = self.rows(ids)
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        return out

    def rows(self, ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The cached part of ``ids`` in order: cached ones as stored, the others computed (canonically, records of
        one length together) and kept within the budget."""
        keys = [tuple(record) for record in ids]
        found = {k: self.store[k] for k in keys if k in self.store}
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for key in dict.fromkeys(k for k in keys if k not in found):
            by_length.setdefault(len(key), []).append(key)
        for records in by_length.values():
            for key, value in zip(records, self._computed(records)):
                found[key] = value
                self._keep(key, value)
        return [found[k] for k in keys]

    def fill(self, ids: Sequence[Sequence[int]], progress: bool = False) -> None:
        """Compute every cacheable record of ``ids`` up front, records of one length together (their canonical
        computation, :meth:`_computed`), until the memory budget is full."""
        from tqdm import tqdm

        by_length: dict[int, list[tuple[int, ...]]] = {}
        for record in dict.fromkeys(tuple(r) for r in ids):
            if record not in self.store and self.live.isdisjoint(record):
                by_length.setdefault(len(record), []).append(record)
        todo = sum(len(v) for v in by_length.values())
        desc = "features" if self.depth is None else f"layers 0-{self.depth - 1} once"
        with tqdm(total=todo, desc=desc, unit="record", disable=not progress) as bar:
            for _, records in sorted(by_length.items()):
                for first in range(0, len(records), 8 * self.GROUP):
                    chunk = records[first : first + 8 * self.GROUP]
                    for record, value in zip(chunk, self._computed(chunk)):
                        self._keep(record, value)
                    bar.update(len(chunk))
                    if chunk[-1] not in self.store:
                        return  # the budget is full: the rest is computed when a batch needs it

    def stable(self, ids: Sequence[Sequence[int]]) -> bool:
        """Whether these records' features stay fixed while the head moves (none holds a head row's token)."""
        return all(self.live.isdisjoint(record) for record in ids)


class ScoredView(TrainableView):
    """A trainable view that also scores examples with its task model: what the ZO step needs of a model
    (:class:`client.zo_step.ZoModel`), on torch."""

    def __init__(self, task: TextClassifier, selection: TrainableSet, kind: DirectionKind = "rademacher",
                 values: Sequence[torch.Tensor] | None = None, feature_cache_mb: int = 1024) -> None:
        super().__init__(task.module, selection, kind, values)
        self.task = task
        # A head-only set: the body is frozen, so each record's features are computed once (FeatureCache).
        self.cache = FeatureCache(task, feature_cache_mb) if _is_head(task, selection) else None
        if self.cache is not None:
            log.info("only the classifier head is trainable: each record's features are computed once "
                     "(cache up to %d MB in memory)", feature_cache_mb)
        # Layers below the trainable set see the same weights in every pass of a step: their output is
        # computed once per batch, between snapshot() and restore(), and reused by both perturbed passes; or
        # once per record, where prepare() finds that pays.
        self.depth = 0 if self.cache is not None else task.frozen_depth(selection.names)
        self.feature_cache_mb = feature_cache_mb
        self.prefixes: FeatureCache | None = None  # those layers' output per record, once prepare() chose it
        self._prefixes: dict[tuple[tuple[int, ...], ...], torch.Tensor] = {}
        self._layout: tuple[torch.Tensor, torch.Tensor] | None = None  # the head's, once a frame step needs it
        if self.depth:
            log.info("trainable set starts at layer %d: layers 0-%d run once per batch, not once per pass",
                     self.depth, self.depth - 1)

    @classmethod
    def placed(cls, task: TextClassifier, selection: TrainableSet, kind: DirectionKind, device: torch.device,
               dtype: torch.dtype, feature_cache_mb: int = 1024) -> "ScoredView":
        """The view after ``task.place(device, dtype)``, its float32 master taken from the float32 values before
        the cast (a bfloat16 weight cannot give them back)."""
        values = TrainableView(task.module, selection).values() if dtype != task.dtype else None
        task.place(device, dtype)
        return cls(task, selection, kind, values=values, feature_cache_mb=feature_cache_mb)

    def prepare(self, ids: Sequence[Sequence[int]], visits: float, progress: bool = False) -> None:
        """Before steps over the records ``ids``, each expected to be drawn ``visits`` times: compute each record's
        frozen part once where that pays. A head-only set: every record's features (a step then costs the head's
        scores). A set above layer ``depth``: those layers' output for every record, when a record is drawn at
        least once on average (else the per-batch prefix costs less than the records' one pass) and all of them
        fit in ``model.feature_cache_mb``; a step then runs only the layers from ``depth`` on, twice."""
        if self.cache is not None:
            self.cache.fill(ids, progress)
            return
        if not self.depth or visits < 1 or not len(ids):
            return
        stored = self.prefixes.store if self.prefixes is not None else {}
        records = [r for r in dict.fromkeys(tuple(r) for r in ids) if r not in stored]
        if not records:
            return
        per_token = self.task.prefix_hidden(self.task.collate([records[0]], np.zeros(1, dtype=np.int64)),
                                            self.depth)
        need = sum(len(r) for r in records) * per_token[0, 0].numel() * per_token.element_size()
        held = self.prefixes.bytes if self.prefixes is not None else 0
        if held + need > self.feature_cache_mb * 2**20:
            # (no record count or size here: on a node, these are its private data's)
            log.info("the output of layers 0-%d for these records exceeds model.feature_cache_mb = %d: computed "
                     "once per batch for them", self.depth - 1, self.feature_cache_mb)
            return
        if self.prefixes is None:  # a view serving several nodes' records (a simulation) adds each one's
            self.prefixes = FeatureCache(self.task, self.feature_cache_mb, self.depth)
        self.prefixes.fill(records, progress)
        log.info("layers 0-%d run once per record: a step runs layers %d on", self.depth - 1, self.depth)

    def snapshot(self) -> None:
        self._prefixes.clear()
        super().snapshot()

    def restore(self) -> None:
        super().restore()
        self._prefixes.clear()

    def per_example_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return self._head_loss(ids, labels)
        batch = self.task.collate(ids, labels)
        if not self.depth or not self._stepping:
            return self.task.per_example_loss(batch).cpu().numpy()
        key = tuple(tuple(x) for x in ids)
        if key not in self._prefixes:
            # the records' stored states where prepare() kept all of them; else this batch's own prefix (a record
            # not stored would be computed alone or in a filler group: dearer than the batch's one pass)
            stored = self.prefixes
            if stored is not None and all(x in stored.store for x in key):
                self._prefixes[key] = stored.padded(ids, batch.input_ids.shape[1]).to(batch.input_ids.device)
            else:
                self._prefixes[key] = self.task.prefix_hidden(batch, self.depth)
        return self.task.per_example_loss(batch, self._prefixes[key], self.depth).cpu().numpy()

    @torch.no_grad()
    def frame_estimates(self, ids: Sequence[Sequence[int]], labels: np.ndarray, seeds: Sequence[int],
                        mu: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Each example's symmetric two-point estimates ``(L(theta + mu z_k) - L(theta - mu z_k)) / (2 mu)`` along
        K Hadamard directions of one sign key, shape (examples, K) float64, and its unperturbed loss; None where this
        shortcut does not apply (then a step makes its K + 1 passes).

        For a head-only set the scores are linear in the head's entries, so the scores at theta + mu z_k are the
        scores at theta plus mu times the projections of each example's (features, 1), signed and placed by
        :meth:`TextClassifier.head_layout`, onto the Hadamard rows: one Walsh-Hadamard transform per example and
        class gives all K of them (n log n additions instead of K passes). Each example alone (row-by-row scores,
        a transform per vector), so no example's estimate depends on another's."""
        if (self.cache is None or self.kind != "hadamard" or not len(ids) or not self.cache.stable(ids)
                or len({s >> 32 for s in seeds}) != 1):
            return None
        size = self.selection.size
        rows = torch.tensor([s & 0xFFFFFFFF for s in seeds], dtype=torch.long)
        n = transform_length(int(rows.max()), size)
        if self._layout is None:
            self._layout = self.task.head_layout()
        classes, cols = self._layout
        if len(ids) * int(classes.max() + 1) * n > 1 << 27:  # the transform's float32 working set past 512 MB
            return None
        features = self.cache.features(ids).to(torch.float64)
        weight, bias = self.task.head_weights()
        weight, bias = weight.to(torch.float64), None if bias is None else bias.to(torch.float64)
        scores = (features[:, None, :] * weight[None]).sum(-1) + (0.0 if bias is None else bias)
        inputs = torch.cat([features, features.new_ones(len(ids), 1)], dim=1)[:, cols]
        signs = direction_torch(seeds[0] >> 32, 0, size, "rademacher", dtype=torch.float64, device=features.device)
        # The transform in float32 (4x faster): its rounding is relative to each projection, and the loss
        # differences below are taken in float64, so nothing is divided by mu's worth of cancellation.
        placed = torch.zeros(len(ids), weight.shape[0], n, dtype=torch.float32, device=features.device)
        placed[:, classes, torch.arange(size)] = (inputs * signs).to(torch.float32)
        moves = walsh_hadamard(placed)[:, :, rows.to(features.device)].transpose(1, 2).to(torch.float64)
        target = torch.as_tensor(labels, dtype=torch.long, device=features.device)[:, None, None]

        def loss(at: torch.Tensor) -> torch.Tensor:  # cross-entropy of (examples, K, classes) scores
            return torch.logsumexp(at, dim=2) - at.gather(2, target.expand(-1, at.shape[1], 1))[:, :, 0]

        centre = scores[:, None, :]  # (examples, K = 1, classes)
        g = (loss(centre + mu * moves) - loss(centre - mu * moves)) / (2 * mu)
        return g.cpu().numpy(), loss(centre)[:, 0].to(torch.float32).cpu().numpy()

    @torch.no_grad()
    def _head_loss(self, ids: Sequence[Sequence[int]], labels: np.ndarray) -> np.ndarray:
        """Cross-entropy of the head's scores on each record's features, each record's from its own features
        alone; within a step, the stacked features of a batch whose features cannot move are kept for all its
        passes (K + 1 of them with K directions)."""
        assert self.cache is not None
        key = tuple(tuple(x) for x in ids) if self._stepping else None
        features = self._prefixes.get(key) if key is not None else None
        if features is None:
            features = self.cache.features(ids)
            if key is not None and self.cache.stable(ids):
                self._prefixes[key] = features
        weight, bias = self.task.head_weights()
        # Row by row, not a matrix product: a GEMM's rounding may depend on the batch's size, and a record's
        # loss should depend on that record alone.
        scores = (features[:, None, :] * weight[None]).sum(-1)
        if bias is not None:
            scores = scores + bias
        target = torch.as_tensor(labels, dtype=torch.long, device=scores.device)
        return torch.nn.functional.cross_entropy(scores.float(), target, reduction="none").cpu().numpy()


def _is_head(task: TextClassifier, selection: TrainableSet) -> bool:
    """Whether ``selection`` is exactly the task's classifier head (``selection.mode = "head"``, or patterns
    that pick the same entries)."""
    if task.generation:
        return False
    return selection.digest() == task.head_set().digest()
