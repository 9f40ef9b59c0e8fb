"""Which parameter entries are trained: everything, name patterns, or data-free pruning (DP-ZOPO).

A :class:`TrainableSet` fixes an ordered list of (parameter name, flat entry indices). Its entries, in that
order, form the flat vector over which directions are generated, so every node that holds the same base
weights and the same set perturbs and updates the same entries. The set's digest lets nodes check that.

Pruning uses a SynFlow-style score computed from the public weights alone (absolute weights, an all-ones
input, score = |w * dR/dw| with R the summed output), so it costs no privacy budget and is recomputed
identically everywhere. Scores are computed one parameter group at a time so that at most one group's
gradient exists at once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from seedtune.shared.task.config import PRUNE_STRATEGIES
from seedtune.shared.protocol.digest import selection_digest

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainableSet:
    """Ordered trainable entries: ``indices[name]`` is None for a whole tensor, else sorted flat indices."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    indices: tuple[torch.Tensor | None, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("the trainable set is empty: no parameter matched the selection")

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(
            math.prod(shape) if idx is None else int(idx.numel()) for shape, idx in zip(self.shapes, self.indices)
        )

    @property
    def size(self) -> int:
        return sum(self.counts)

    def segments(self) -> Iterator[tuple[str, torch.Tensor | None, int, int]]:
        """Yield (name, indices, offset in the flat direction vector, count)."""
        offset = 0
        for name, idx, count in zip(self.names, self.indices, self.counts):
            yield name, idx, offset, count
            offset += count

    def digest(self) -> str:
        return selection_digest(self.names, self.shapes,
                                [None if idx is None else idx.to(torch.int64).numpy() for idx in self.indices])

    def union(self, other: "TrainableSet", order: Iterable[str]) -> "TrainableSet":
        """Entries in either set, names kept in ``order`` (the model's parameter order)."""
        mine = dict(zip(self.names, zip(self.shapes, self.indices)))
        theirs = dict(zip(other.names, zip(other.shapes, other.indices)))
        names, shapes, indices = [], [], []
        for name in order:
            if name not in mine and name not in theirs:
                continue
            parts = [entry for entry in (mine.get(name), theirs.get(name)) if entry is not None]
            shape = parts[0][0]
            if any(idx is None for _, idx in parts):
                merged = None
            else:
                merged = torch.unique(torch.cat([idx for _, idx in parts if idx is not None]))
            names.append(name)
            shapes.append(shape)
            indices.append(merged)
        return TrainableSet(tuple(names), tuple(shapes), tuple(indices))

    def fraction_of(self, model: nn.Module) -> float:
        return self.size / sum(p.numel() for p in model.parameters())


def _named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() drops tied duplicates (e.g. a decoder's lm_head tied to its embedding), which is
    # what we want: a tied tensor is one set of entries.
    return list(model.named_parameters())


def _whole_tensors(params: list[tuple[str, nn.Parameter]]) -> TrainableSet:
    return TrainableSet(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params), (None,) * len(params))


def select_all(model: nn.Module) -> TrainableSet:
    return _whole_tensors(_named_params(model))


def select_patterns(model: nn.Module, patterns: Iterable[str]) -> TrainableSet:
    """Whole tensors whose name matches any glob pattern (``*`` spans dots), e.g. ``*norm*`` or ``head.*``."""
    patterns = list(patterns)
    if not patterns:
        raise ValueError("selection mode 'patterns' needs at least one pattern")
    chosen = [(n, p) for n, p in _named_params(model) if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        names = ", ".join(n for n, _ in _named_params(model)[:8])
        raise ValueError(f"no parameter name matches patterns {patterns}; names look like: {names}, ...")
    return _whole_tensors(chosen)


@contextlib.contextmanager
def _absolute_weights(model: nn.Module) -> Iterator[None]:
    """Temporarily replace every weight by its absolute value; the signs are kept as 1 bit per entry."""
    signs = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            signs[name] = torch.signbit(p)
            p.abs_()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p[signs[name]] = p[signs[name]].neg()


def synflow_scores(
    model: nn.Module,
    synflow_output: Callable[[], torch.Tensor],
    names: Iterable[str] | None = None,
    group_size: int = 8,
) -> dict[str, torch.Tensor]:
    """SynFlow importance |w * dR/dw| for each named parameter, evaluated at the absolute weights.

    ``synflow_output`` runs the model on its all-ones input and returns a scalar R. Gradients are taken for
    ``group_size`` parameters at a time so extra memory stays at a few tensors' worth. Parameters that R does
    not depend on (e.g. token embeddings when the input bypasses them) score zero.
    """
    params = dict(_named_params(model))
    wanted = list(params) if names is None else list(names)
    requires = {n: p.requires_grad for n, p in params.items()}
    scores: dict[str, torch.Tensor] = {}
    try:
        with _absolute_weights(model):
            for p in params.values():
                p.requires_grad_(False)
            for start in range(0, len(wanted), group_size):
                group = wanted[start : start + group_size]
                for n in group:
                    params[n].requires_grad_(True)
                output = synflow_output()
                if output.requires_grad:
                    grads = torch.autograd.grad(output, [params[n] for n in group], allow_unused=True)
                else:  # R does not depend on this group at all
                    grads = (None,) * len(group)  # type: ignore[assignment]  # as autograd.grad's allow_unused
                for n, g in zip(group, grads):
                    p = params[n]
                    scores[n] = torch.zeros_like(p) if g is None else (p.detach() * g).abs_()
                    p.requires_grad_(False)
    finally:
        for n, p in params.items():
            p.requires_grad_(requires[n])
    return scores


def _kth_largest_bits(bits: list[torch.Tensor], keep: int) -> int:
    """The int32 bit pattern of the ``keep``-th largest score, by bisection on bit patterns: for finite,
    non-negative float32 values they sort exactly as the values do. Each probe counts entries above a
    pattern one tensor at a time, so no copy of all the scores (or an argsort of them) is ever made: for a
    135M-parameter model that copy and sort needed several GB more than the model."""
    lo, hi = -1, max(int(b.max()) for b in bits if b.numel())  # count_above(lo) >= keep > count_above(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(int((b > mid).sum()) for b in bits) < keep:
            hi = mid
        else:
            lo = mid
    return hi


def top_fraction(scores: Mapping[str, torch.Tensor], fraction: float, order: Iterable[str]) -> TrainableSet:
    """Keep the globally highest-scoring ``fraction`` of entries; ties are broken by position, deterministically
    (the first entries in ``order`` win), so every node selects the same set."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"pruning fraction must be in (0, 1], got {fraction}")
    order = [n for n in order if n in scores]
    bits = [scores[n].reshape(-1).float().contiguous().view(torch.int32) for n in order]
    if any(bool((b < 0).any()) or bool((b >= 0x7F800000).any()) for b in bits):
        raise ValueError("SynFlow scores must be finite and non-negative")
    keep = max(1, int(round(fraction * sum(b.numel() for b in bits))))
    threshold = _kth_largest_bits(bits, keep)
    ties_left = keep - sum(int((b > threshold).sum()) for b in bits)
    names, shapes, indices = [], [], []
    for n, b in zip(order, bits):
        ties = torch.nonzero(b == threshold).reshape(-1)[:ties_left]
        ties_left -= ties.numel()
        chosen = torch.sort(torch.cat([torch.nonzero(b > threshold).reshape(-1), ties])).values
        if chosen.numel():
            names.append(n)
            shapes.append(tuple(scores[n].shape))
            indices.append(chosen)
    return TrainableSet(tuple(names), tuple(shapes), tuple(indices))


def select_pruned(
    model: nn.Module, synflow_output: Callable[[], torch.Tensor], fraction: float, patterns: Iterable[str] = ()
) -> TrainableSet:
    """DP-ZOPO's data-free mask: the top ``fraction`` of SynFlow scores (optionally within name patterns)."""
    candidates = [n for n, _ in _named_params(model)]
    patterns = list(patterns)
    if patterns:
        candidates = [n for n in candidates if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    scores = synflow_scores(model, synflow_output, candidates)
    selected = top_fraction(scores, fraction, candidates)
    log.info("pruned trainable set: %d entries (%.3f%% of candidates) in %d tensors",
             selected.size, 100.0 * selected.size / sum(s.numel() for s in scores.values()), len(selected.names))
    return selected


def stage_fraction(base_fraction: float, strategy: str, stage: int) -> float:
    """Fraction kept in ``stage``: constant for static/dynamic, growing linearly for incremental."""
    if strategy not in PRUNE_STRATEGIES:
        raise ValueError(f"unknown pruning strategy {strategy!r}; choose one of {PRUNE_STRATEGIES}")
    if strategy == "incremental":
        return min(1.0, base_fraction * (stage + 1))
    return base_fraction
